"""What a training run checks before it writes a file or loads a model: that a new run's ``--out`` holds
nothing of the user's, that ``init_from`` is a Janus checkpoint, that a resumed run's recipe and
checkpoint can be read. A mistake found here costs a second, not a half-trained run or a user's files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointError, InputError
from ..io.checkpoint import read_json
from ..io.folders import writable_folder
from .checkpoint import load_training_state
from .recipe import Recipe

# the files a run writes beside its weights (a fine-tuned run copies them from ``init_from``)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "processor_config.json", "chat_template.jinja", "preprocessor_config.json",
                    "special_tokens_map.json")


def check_new_run_folder(out: Path) -> None:
    """Create a new run's ``--out``, which must be a folder that is missing, empty, or left by a run of this trainer that stopped
    before its first checkpoint (nothing to resume, nothing lost). Anything else may be the user's files
    (the run writes config.json, tokenizer.json... into it) and is refused rather than overwritten."""
    if (out / "training" / "checkpoint.pt").exists() or (out / "model.safetensors").exists():
        raise InputError(f"{out} already holds a training run or a model: pass --resume to continue it, or choose "
                         f"another --out folder")
    if out.is_dir():
        names = {item.name for item in out.iterdir()}
        unfinished = (out / "training" / "recipe.json").is_file() and names <= {"training", *CHECKPOINT_FILES}
        if names and not unfinished:
            shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
            raise InputError(f"--out {out} is not empty (it holds {shown}) and training writes its checkpoint files "
                             f"there; choose a new or empty folder")
    writable_folder(out, "--out", "the run")


def check_init_from(name: str) -> None:
    """``init_from`` names a Janus checkpoint with weights (checked before anything is written)."""
    from ..io.checkpoint import resolve_model_path, weight_files
    try:
        folder = resolve_model_path(name)
        model_type = read_json(folder / "config.json").get("model_type")
    except CheckpointError as err:
        raise InputError(f"recipe.init_from: {err}") from None
    if model_type != "janus":
        raise InputError(f"recipe.init_from {name} is a {model_type or 'untyped'} checkpoint; fine-tuning needs a "
                         f"Janus checkpoint (config.json with model_type 'janus'), or null for a fresh model")
    weight_files(folder)


def _absolute(path: str | None) -> str | None:
    return path if path is None else str(Path(path).expanduser().resolve())


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its data files and a local ``init_from`` folder as absolute paths (a hub model id
    stays as written), so ``training/recipe.json`` names the same files from any directory: a relative
    path resumed elsewhere would fail, or silently read other data."""
    init_from = recipe.init_from
    if init_from and Path(init_from).expanduser().exists():
        init_from = _absolute(init_from)
    data = replace(recipe.data, understanding=_absolute(recipe.data.understanding),
                   generation=_absolute(recipe.data.generation))
    return replace(recipe, init_from=init_from, data=data)


def _resolved_older_paths(recipe: Recipe, saved_recipe: Path) -> Recipe:
    """A recipe.json written before runs stored absolute paths: its relative paths are read from the current
    directory, as that version did, with a warning (which directory the run started in is not recorded);
    a file not there is an error saying what to edit."""
    import warnings

    for name, path in (("data.understanding", recipe.data.understanding), ("data.generation", recipe.data.generation),
                       ("init_from", recipe.init_from)):
        if not path or Path(path).expanduser().is_absolute() or (name == "init_from" and not Path(path).exists()):
            continue  # (an init_from that is not a folder here is a hub id)
        if not Path(path).exists():
            raise InputError(f"{saved_recipe} names {name} {path!r} relative to the directory the run started in, "
                             f"which is not recorded, and it is not in this one; resume from that directory or "
                             f"edit it to the absolute path")
        warnings.warn(f"{saved_recipe} names {name} {path!r} relative to the directory the run started in; reading "
                      f"{_absolute(path)}", stacklevel=3)
    return with_absolute_paths(recipe)


def resumed_recipe(out: Path, saved_recipe: Path, checkpoint_path: Path, given: Recipe | None) -> Recipe:
    """The recipe a resumed run continues: its own (``training/recipe.json``). A different one given
    alongside ``--resume`` is refused rather than silently ignored."""
    if not checkpoint_path.is_file():
        raise InputError(f"nothing to resume in {out}: {checkpoint_path} is missing")
    recipe = _resolved_older_paths(Recipe.from_file(saved_recipe), saved_recipe)
    if given is not None and with_absolute_paths(given).to_dict() != recipe.to_dict():
        raise InputError(f"--resume continues the run's own recipe ({saved_recipe}), and the one given differs; "
                         f"leave --config out to resume, or start the new recipe in another --out folder")
    return recipe


def usable_threads(threads: int) -> int:
    """``threads`` lowered to the CPUs this process may run on (with a warning): more threads than cores
    only wait on each other (4 steps took minutes instead of seconds with 10,000 on 2 cores)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > available:
        import warnings
        warnings.warn(f"recipe.threads is {threads} but this process may use {available} CPUs; "
                      f"training on {available} threads", stacklevel=3)
        return available
    return threads


def load_state(path: Path) -> dict:
    """The resumable state in ``path``, or an error saying the file is damaged."""
    try:
        return load_training_state(path)
    except Exception as err:  # a truncated file (a full disk) or one that is not vlmkit's
        raise InputError(f"cannot read the training checkpoint {path} ({type(err).__name__}: {str(err)[:200]}); "
                         f"it is damaged: start the run again in a new --out folder") from None
