"""Procedural data: the built-in model's world of coloured shapes, and an independent pixel checker."""

from .checker import DetectedObject, detect_objects, judge_image
from .shapes import (BACKGROUNDS, COLOURS, POSITIONS, QUESTION_TYPES, SHAPES, Scene, SceneObject, caption,
                     questions, render, sample_scene)

__all__ = ["BACKGROUNDS", "COLOURS", "POSITIONS", "QUESTION_TYPES", "SHAPES", "Scene", "SceneObject", "caption",
           "questions", "render", "sample_scene", "DetectedObject", "detect_objects", "judge_image"]
