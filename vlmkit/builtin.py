"""Where the built-in model lives (shipped inside the package once it is trained)."""

from pathlib import Path

from .errors import CheckpointError

BUILTIN_DIR = Path(__file__).parent / "builtin_model"


def builtin_model_path() -> str:
    """The shipped model's folder; a clear error while none is shipped."""
    if (BUILTIN_DIR / "config.json").is_file():
        return str(BUILTIN_DIR)
    raise CheckpointError("no model given and no built-in model is shipped in this version: pass --model PATH "
                          "(a checkpoint folder or a cached hub id) or set VLMKIT_MODEL")
