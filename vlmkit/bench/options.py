"""The benchmark's option types and up-front checks: a bad value, an output that cannot be written or a
missing optional dependency stops ``vlmkit bench`` before its first measurement, not after the minutes
of timing whose figures it would lose."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cache_folder(text: str) -> str:
    """``--cache-dir``: a folder that exists, or can be created, and is writable (checkpoints are built there)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder for the benchmark's checkpoints")
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be created or written ({existing} is not a writable "
                                         f"folder); give another folder")
    return str(path)


def json_output(text: str) -> str:
    """``--json``: a file path whose folder exists and is writable (the report is written at the very end)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name for the JSON report")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist; create it or give another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} is not writable; give another path")
    return str(path)


# optional dependency -> the extra that installs it
_EXTRAS = {"bitsandbytes": "bnb", "accelerate": "bnb", "llguidance": "serve"}


def missing_extra(modules: list[str], why: str) -> str | None:
    """The one-line error for the first of ``modules`` that is not installed, else None."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"vlmkit bench: {why} needs {module}: pip install 'vlmkit[{_EXTRAS[module]}]'"
    return None


def llama_cpp_problem(args) -> str | None:
    """The one-line error for ``--llama-cpp`` / ``--build-llama-cpp`` that would be ignored (no ``--quantize``:
    llama.cpp's rows are in its table) or a ``--llama-cpp`` folder without a built llama.cpp, else None;
    checked before the first measurement, not after the other variants' minutes of timing."""
    from .llama_cpp import missing_files

    given = [flag for flag, value in (("--llama-cpp", getattr(args, "llama_cpp", None)),
                                      ("--build-llama-cpp", getattr(args, "build_llama_cpp", False))) if value]
    if given and not getattr(args, "quantize", None):
        return (f"vlmkit bench: {' and '.join(given)} only apply with --quantize (llama.cpp's rows are in the "
                f"quantized-weights table); add --quantize int8 (or all), or leave {' and '.join(given)} out")
    tree = getattr(args, "llama_cpp", None)
    if tree:
        path = Path(tree).expanduser()
        if not path.is_dir():
            return (f"vlmkit bench: --llama-cpp {tree}: no such folder; give a llama.cpp source tree, or "
                    f"--build-llama-cpp")
        missing = missing_files(path)
        if missing:
            return (f"vlmkit bench: --llama-cpp {tree}: no {' and no '.join(missing)} there; build llama.cpp in it "
                    f"(cmake -B build && cmake --build build --target llama-bench), or use --build-llama-cpp")
    return None
