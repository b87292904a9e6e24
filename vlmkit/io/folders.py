"""Folders the command line writes into (pictures, a training run), checked and created before any long
work, so a bad path is a clear error at once rather than after minutes of drawing or training."""

import os
from pathlib import Path

from ..errors import InputError


def writable_folder(path: Path, option: str, purpose: str) -> Path:
    """``path`` created if missing; an ``InputError`` naming ``option`` when it is a file, cannot be created
    or cannot be written to. ``purpose`` says what the folder is for ("the PNGs")."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option}: {path} is a file; give a folder for {purpose}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{option}: cannot create {path}: {err.strerror or err}; choose another folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{option}: {path} is not writable; choose another folder")
    return path
