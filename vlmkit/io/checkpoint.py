"""Checkpoint folders: finding them (local path or HF cache), their weight files (safetensors first,
``.bin`` only through torch's restricted ``weights_only`` loader) and loading weights straight into a
model built on the meta device, in their final dtype and device."""

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .dtype_names import DTYPE_ALIASES
from .mapped_safetensors import MappedSafetensors

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# the dtype names from_pretrained(dtype=...) and --dtype take
DTYPE_NAMES = {name: getattr(torch, dtype) for name, dtype in DTYPE_ALIASES.items()}


def hf_cache_dir() -> Path:
    """Where the Hugging Face hub cache lives, honouring HF_HUB_CACHE and HF_HOME."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


# from_pretrained options about fetching from the hub: vlmkit only reads folders and the local cache, so
# they change nothing (checkpoint_location refuses force_download=True)
HUB_OPTIONS = ("token", "use_auth_token", "proxies", "resume_download", "local_files_only", "trust_remote_code",
               "force_download", "mirror", "_from_auto", "user_agent")


# the from_pretrained options that say where a checkpoint is: the model's and its processor's alike
LOCATION_OPTIONS = ("revision", "cache_dir", "subfolder") + HUB_OPTIONS


def resolve_model_path(name_or_path: str | os.PathLike, revision: str = "main", cache_dir=None,
                       subfolder: str = "") -> Path:
    """A local checkpoint folder, or the snapshot of a hub model id already in the local HF cache
    (``cache_dir`` when given, as transformers' option names the hub cache folder); ``subfolder``: the
    checkpoint's folder inside it.

    Nothing is downloaded: a model id that is not cached is an error naming where it should be."""
    folder = _model_folder(name_or_path, revision, cache_dir)
    if subfolder:
        folder = folder / subfolder
        if not folder.is_dir():
            raise CheckpointError(f"{name_or_path} has no subfolder {subfolder!r}")
    return folder


def checkpoint_location(name_or_path, options: dict, revision: str | None = None) -> Path:
    """The folder ``from_pretrained(name_or_path, **options)`` reads: takes ``revision``, ``cache_dir`` and
    ``subfolder`` out of ``options``, and the hub options (``token``, ``proxies``...), which change nothing
    where nothing is downloaded; ``force_download=True`` is an error saying so."""
    revision = options.pop("revision", None) or revision or "main"
    cache_dir, subfolder = options.pop("cache_dir", None), options.pop("subfolder", None) or ""
    if options.get("force_download"):
        raise CheckpointError("force_download=True: vlmkit never downloads; fetch the checkpoint first "
                              "(e.g. `hf download <id>`) and load it from the cache or its folder")
    for key in HUB_OPTIONS:
        options.pop(key, None)
    return resolve_model_path(name_or_path, revision, cache_dir, subfolder)


def _model_folder(name_or_path, revision: str, cache_dir) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the checkpoint folder that holds config.json")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        repo = (Path(cache_dir).expanduser() if cache_dir else hf_cache_dir()) / ("models--" + name.replace("/", "--"))
        ref = repo / "refs" / revision
        snapshot = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
        if snapshot.is_dir():
            return snapshot
        snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        if len(snapshots) == 1 and revision == "main":
            return snapshots[0]
        raise CheckpointError(
            f"model {name!r} is neither a local folder nor in the local Hugging Face cache (looked in {repo}). "
            f"vlmkit never downloads: fetch it first, e.g. `hf download {name}` "
            f"(it lands in {repo}), or pass the path of a folder that holds it.")
    raise CheckpointError(f"checkpoint folder {name!r} does not exist")


def read_json(path: Path) -> dict:
    """A JSON file holding an object (every checkpoint metadata file does), with a clear error when it is
    missing, unreadable, malformed or holds another kind of value."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a file; put the checkpoint's {Path(path).name} there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; it must be a readable UTF-8 JSON file") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(values), "null")
        raise CheckpointError(f"{path} holds {kind}, not a JSON object ({{...}}); replace it with the "
                              f"checkpoint's own {Path(path).name}")
    return values


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, every shard checked to exist. safetensors win over ``.bin``."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; "
                                      f"download the checkpoint again")
            shards = sorted(set(weight_map.values()))
            _check_shard_names(index, shards)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder} is incomplete: shard(s) {', '.join(missing)} listed in "
                                      f"{index_name} are missing; download the checkpoint again")
            if not shards:
                raise CheckpointError(f"{index} lists no weight files")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, {SAFETENSORS_INDEX}, "
                          f"pytorch_model.bin or {BIN_INDEX}")


def _check_shard_names(index: Path, shards: list[str]) -> None:
    """Shards are files inside the checkpoint folder, and a safetensors index names safetensors only: an
    index must not lead the loader to other folders, nor to pickle files where safetensors were promised."""
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts or "\\" in s]
    if outside:
        raise CheckpointError(f"{index}: weight_map names shard(s) outside the checkpoint folder: "
                              f"{', '.join(outside[:5])}; shard names must be file names inside {index.parent}: "
                              f"download the checkpoint again")
    if index.name == SAFETENSORS_INDEX:
        other = [s for s in shards if not s.endswith(".safetensors")]
        if other:
            raise CheckpointError(f"{index}: a safetensors index may only name .safetensors shards, but it names "
                                  f"{', '.join(other[:5])}; download the checkpoint again")


def iter_checkpoint_names(files: list[Path]) -> Iterator[str]:
    """The tensor names in ``files`` (safetensors: from the headers, no tensor data read)."""
    for name, _ in iter_checkpoint_tensors(files):
        yield name


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, load) pairs over all files; ``load()`` gives one tensor, a view of the memory-mapped file
    where possible (mapped_safetensors.py: nothing is copied until a dtype or device change needs it)."""
    for file in files:
        if file.suffix == ".safetensors":
            handle = _open_safetensors(file)
            for name in handle.keys():
                yield name, (lambda h=handle, n=name: h.get_tensor(n))
        else:
            state = _load_bin(file)
            for name, tensor in state.items():
                yield name, (lambda t=tensor: t)


def _open_safetensors(file: Path) -> MappedSafetensors:
    try:
        return MappedSafetensors(file)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None


def _load_bin(file: Path) -> dict:
    # weights_only=True uses torch's restricted unpickler: tensors and plain containers only, no code.
    try:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(str(file), map_location="cpu", weights_only=True)  # old non-zip format
    except Exception as err:  # refused pickles, corrupt or truncated files: torch raises many types
        raise CheckpointError(f"cannot load {file} with torch's safe weights-only loader ({_load_failure(err)}); "
                              f"vlmkit never unpickles code or objects other than tensors: use a checkpoint "
                              f"that holds only tensors, or its safetensors files") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a dict of tensors")
    return state


def _load_failure(err: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused (a global it blocks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith(("Unsupported", "WeightsUnpickler error: Unsupported")):
            return line
    return lines[0][:300] if lines else type(err).__name__


# the dtypes a model computes in; others (integer, float8, complex) cannot hold its activations
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_dtype(dtype, config: dict, files: list[Path] | None = None) -> torch.dtype:
    """A torch dtype from ``dtype``/``torch_dtype`` arguments: a dtype, a name, or "auto" (None means "auto",
    transformers 5's default). "auto" is what transformers' ``_get_dtype`` picks: the config's top-level
    ``dtype`` (``torch_dtype`` in older files), else the dtype the weights in ``files`` are stored in
    (``stored_dtype``), else float32. Names are vlmkit's (``DTYPE_NAMES``) or torch's own attribute names
    (``"float64"``), with or without ``"torch."`` in front (which transformers refuses); a dtype that no model
    computes in (an integer one: use ``quantization_config`` for int8 weights) is an ``InputError``."""
    if dtype is None or dtype == "auto":
        key = "dtype" if config.get("dtype") is not None else "torch_dtype"
        name = config.get(key)
        if name is None:
            return stored_dtype(files) if files else torch.float32
        found = _named_dtype(name)
        if found is None:
            raise CheckpointError(f"config.json: {key} is {name!r}, which names no torch dtype; it should be "
                                  f"'bfloat16', 'float16' or 'float32' (or leave it out: the weights' own dtype is "
                                  f"used)")
        # a config naming an integer dtype (quantized exports do) loads in the dtype its weights are stored in
        return found if found in COMPUTE_DTYPES else stored_dtype(files) if files else torch.float32
    found = dtype if isinstance(dtype, torch.dtype) else _named_dtype(dtype)
    if found is None or found not in COMPUTE_DTYPES:
        what = "is not a dtype name" if found is None else "is not a floating dtype a model computes in"
        raise InputError(f"dtype={dtype!r} {what}; use 'auto', torch.float32, torch.bfloat16, torch.float16 "
                         f"(or their names: 'float32', 'bfloat16', 'float16', 'fp16', 'bf16'); for int8/int4 "
                         f"weights pass quantization_config='int8' or 'int4' instead")
    return found


def _named_dtype(name) -> torch.dtype | None:
    """The torch dtype a name means ("bf16", "bfloat16", "torch.bfloat16", "float64"), or None."""
    if not isinstance(name, str):
        return None
    name = name.removeprefix("torch.")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, as transformers reads it for ``dtype="auto"`` when the
    config names none: a shard index's ``metadata.dtype``, else the first floating tensor of the first file
    (safetensors names in sorted order, as ``safe_open.keys()`` gives them; a .bin's in saved order; float8
    never, transformers does not pick it as a model's dtype). A checkpoint of mixed dtypes loads wholly in
    that one; one without floating tensors in float32."""
    folder = files[0].parent
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            metadata = read_json(folder / index_name).get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                # transformers fails on it too; a clear message instead of an AttributeError
                raise CheckpointError(f"{folder / index_name}: metadata must be a JSON object ({{...}}), got "
                                      f"{type(metadata).__name__}; download the checkpoint again, or remove "
                                      f"\"metadata\" from the index")
            name = (metadata or {}).get("dtype")
            if isinstance(name, str) and name in DTYPE_NAMES:
                return DTYPE_NAMES[name]
    if files[0].suffix == ".safetensors":
        handle = _open_safetensors(files[0])
        found = (handle.dtype(name) for name in sorted(handle.keys()))
    else:
        found = (t.dtype for t in _load_bin(files[0]).values() if torch.is_tensor(t))
    return next((d for d in found if d.is_floating_point and d.itemsize > 1), torch.float32)


def load_weights(model: nn.Module, files: list[Path], *, dtype: torch.dtype, device: torch.device | str,
                 rename: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
                 ignore: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                 unexpected: list[str] | None = None) -> set[str]:
    """Fill ``model`` (built on the meta device) from checkpoint ``files``.

    ``rename(name, tensor)`` maps one checkpoint tensor to zero or more model tensors (families use it
    for their layout differences). Names matching an ``ignore`` pattern are skipped; model tensors
    matching an ``optional`` pattern may be missing (the caller ties or derives them). Floating tensors
    are cast to ``dtype``; every tensor is moved to ``device`` one at a time, so no second full copy of
    the weights is ever held. Returns the names of the model tensors that were missing.

    ``unexpected``: a list to receive the checkpoint tensors the model has no place for, which are then
    skipped, as transformers skips them (an old LLaMA's saved ``rotary_emb.inv_freq``, a head the model does
    not use) as long as every tensor the model needs is there; without it they are an error."""
    expected = dict(model.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    skipped, wrong_shape, wrong_dtype = [], [], []
    for name, load in iter_checkpoint_tensors(files):
        if any(re.search(p, name) for p in ignore):
            continue
        pairs = rename(name, load()) if rename else [(name, load())]
        for target, tensor in pairs:
            if target not in expected:
                skipped.append(name if target == name else f"{name} (as {target})")
                continue
            if tuple(tensor.shape) != tuple(expected[target].shape):
                wrong_shape.append(f"{target}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[target].shape)}")
                continue
            if expected[target].is_floating_point() and not tensor.is_floating_point():
                # an integer tensor cast to floats would load as garbage, and torch refuses it as a parameter
                wrong_dtype.append(f"{name} is stored as {str(tensor.dtype).removeprefix('torch.')}")
                continue
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            loaded[target] = tensor
    missing = sorted(set(expected) - set(loaded))
    required_missing = [m for m in missing if not any(re.search(p, m) for p in optional)]
    problems = []
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} tensors in an integer dtype where the model holds floating-point "
                        f"weights (a quantized or corrupted export? save the weights as float16/bfloat16/float32): "
                        + "; ".join(wrong_dtype[:10]))
    if wrong_shape:
        problems.append("wrongly shaped tensors: " + "; ".join(wrong_shape[:10]))
    if required_missing:
        problems.append(f"{len(required_missing)} missing tensors: " + ", ".join(required_missing[:10]))
    if skipped and (problems or unexpected is None):  # with nothing else wrong, the caller may skip them
        problems.append(f"{len(skipped)} unexpected tensors: " + ", ".join(skipped[:10]))
    if problems:
        raise CheckpointError(f"checkpoint in {files[0].parent} does not fit the model config: "
                              + " | ".join(problems))
    if unexpected is not None:
        unexpected.extend(skipped)
    model.load_state_dict(loaded, strict=False, assign=True)
    return set(missing)


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Recompute derived buffers (e.g. rotary frequencies) after loading; fail on anything still unloaded."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device(device))
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError("weights missing after loading: " + ", ".join(leftovers[:10]))


class WeightLayout:
    """How a checkpoint's tensor names map onto a model: ``rename(name, tensor)`` -> [(name, tensor)],
    regex patterns of checkpoint names to ``ignore``, and model names that may be ``optional``."""

    def __init__(self, rename=None, ignore: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
        self.rename = rename
        self.ignore = ignore
        self.optional = optional
