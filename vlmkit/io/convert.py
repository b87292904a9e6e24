"""``vlmkit convert``: rewrite a ``.bin`` checkpoint (loaded with torch's restricted weights-only
unpickler) as safetensors, copying every other file of the folder."""

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import BIN_INDEX, SAFETENSORS_INDEX, iter_checkpoint_tensors, resolve_model_path, weight_files


def _bin_files(folder: Path) -> list[Path]:
    """The ``.bin`` weight files to convert; a folder that already has safetensors is refused (vlmkit loads
    them as they are, and a copy would carry the ``.bin`` files along)."""
    files = weight_files(folder)
    if files[0].suffix == ".safetensors":
        raise CheckpointError(f"{folder} already holds safetensors weights ({files[0].name}); vlmkit loads them "
                              f"as they are, so there is nothing to convert")
    return files


def _empty_destination(out: Path) -> bool:
    """Check ``out`` can take the copy: missing or an empty folder, never one whose files would be
    overwritten. Returns whether it has to be created."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"destination {out} is a file; give a new folder for the safetensors copy")
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"destination {out} is not empty; give a new or empty folder (convert never "
                              f"overwrites files)")
    return not out.exists()


def convert_to_safetensors(source, destination) -> list[Path]:
    """Write ``destination`` (a new or empty folder) as a copy of ``source`` with safetensors weights;
    returns the files written. On any error nothing is left behind in ``destination``."""
    folder = resolve_model_path(source)
    out = Path(destination).expanduser()
    if out.resolve() == folder.resolve():
        raise CheckpointError("convert needs a destination folder different from the source")
    files = _bin_files(folder)
    created = _empty_destination(out)
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(folder, files, out, written)
    except BaseException as err:
        # a half-written copy would load as a checkpoint with missing weights: remove what this call wrote
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write {out}: {err.strerror or err}") from None
        raise
    return written


def _write(folder: Path, files: list[Path], out: Path, written: list[Path]) -> None:
    from safetensors.torch import save_file

    weight_map = {}
    for index, file in enumerate(files):
        tensors = {}
        for name, load in iter_checkpoint_tensors([file]):
            value = load()
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{file} holds {name!r}, a {type(value).__name__} and not a tensor; convert "
                                      f"takes checkpoints that map weight names to tensors")
            tensors[name] = value.contiguous().clone()  # shared storage (tied weights) must be cloned for safetensors
        name = "model.safetensors" if len(files) == 1 else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        written.append(out / name)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    if len(files) > 1:
        index_path = out / SAFETENSORS_INDEX
        written.append(index_path)
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    skip = {f.name for f in files} | {BIN_INDEX}
    for item in folder.iterdir():
        if item.is_file() and item.name not in skip:
            written.append(out / item.name)
            shutil.copy2(item, out / item.name)
