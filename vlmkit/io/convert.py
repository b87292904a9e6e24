"""``vlmkit convert``: rewrite a ``.bin`` checkpoint (loaded with torch's restricted weights-only
unpickler) as safetensors, copying every other file of the folder."""

import json
import shutil
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import BIN_INDEX, iter_checkpoint_tensors, resolve_model_path, weight_files


def convert_to_safetensors(source, destination) -> list[Path]:
    """Write ``destination`` as a copy of ``source`` with safetensors weights; returns the files written."""
    from safetensors.torch import save_file

    folder = resolve_model_path(source)
    out = Path(destination)
    if out.resolve() == folder.resolve():
        raise CheckpointError("convert needs a destination folder different from the source")
    out.mkdir(parents=True, exist_ok=True)
    files = weight_files(folder)
    written = []
    weight_map = {}
    for index, file in enumerate(files):
        # shared storage (tied weights in .bin files) must be cloned for safetensors
        tensors = {name: load().contiguous().clone() for name, load in iter_checkpoint_tensors([file])}
        name = "model.safetensors" if len(files) == 1 else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        written.append(out / name)
    if len(files) > 1:
        index_path = out / "model.safetensors.index.json"
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        written.append(index_path)
    skip = {f.name for f in files} | {BIN_INDEX}
    for item in folder.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, out / item.name)
            written.append(out / item.name)
    return written
