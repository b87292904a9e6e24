"""The built-in model and its world: where the shipped model lives (``builtin_model_path``), the
procedural shapes world it is trained and judged on (shapes.py), an independent pixel checker
(checker.py), and the shapes-only parts of its training: the data source (source.py), the per-patch
and per-question labels and their heads (label_heads.py), the binding losses (binding.py), and how
they plug into the general trainer (training.py)."""

from pathlib import Path

from ..errors import CheckpointError
from .checker import DetectedObject, detect_objects, judge_image
from .shapes import (BACKGROUNDS, COLOURS, POSITIONS, QUESTION_TYPES, SHAPES, Scene, SceneObject, caption,
                     questions, render, sample_scene)

__all__ = ["BUILTIN_DIR", "builtin_model_path", "BACKGROUNDS", "COLOURS", "POSITIONS", "QUESTION_TYPES", "SHAPES",
           "Scene", "SceneObject", "caption", "questions", "render", "sample_scene", "DetectedObject",
           "detect_objects", "judge_image"]

# the weights folder stays at vlmkit/builtin_model/ (package data, see pyproject.toml)
BUILTIN_DIR = Path(__file__).parent.parent / "builtin_model"


def builtin_model_path() -> str:
    """The shipped model's folder; a clear error while none is shipped."""
    if (BUILTIN_DIR / "config.json").is_file():
        return str(BUILTIN_DIR)
    raise CheckpointError("no model given and no built-in model is shipped in this version: pass --model PATH "
                          "(a checkpoint folder or a cached hub id) or set VLMKIT_MODEL")
