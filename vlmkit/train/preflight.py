"""What a training run checks before it writes a file or loads a model: that a new run's ``--out`` holds
nothing of the user's, that ``init_from`` is a Janus checkpoint, that a resumed run's recipe and
checkpoint can be read. A mistake found here costs a second, not a half-trained run or a user's files."""

from __future__ import annotations

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


def resumed_recipe(out: Path, saved_recipe: Path, checkpoint_path: Path, given: Recipe | None) -> Recipe:
    """The recipe a resumed run continues: its own (``training/recipe.json``). A different one given
    alongside ``--resume`` is refused rather than silently ignored."""
    if not checkpoint_path.is_file():
        raise InputError(f"nothing to resume in {out}: {checkpoint_path} is missing")
    recipe = Recipe.from_file(saved_recipe)
    if given is not None and given.to_dict() != recipe.to_dict():
        raise InputError(f"--resume continues the run's own recipe ({saved_recipe}), and the one given differs; "
                         f"leave --config out to resume, or start the new recipe in another --out folder")
    return recipe


def load_state(path: Path) -> dict:
    """The resumable state in ``path``, or an error saying the file is damaged."""
    try:
        return load_training_state(path)
    except Exception as err:  # a truncated file (a full disk) or one that is not vlmkit's
        raise InputError(f"cannot read the training checkpoint {path} ({type(err).__name__}: {str(err)[:200]}); "
                         f"it is damaged: start the run again in a new --out folder") from None
