"""Training Janus-architecture models with vlmkit's own modules: a VQ-VAE stage, then a joint LM
stage (image understanding + text-to-image), checkpointed and resumable, exported in the
transformers layout. ``vlmkit train --config recipe.json --out DIR [--resume]``."""

from .recipe import DataSpec, LMStage, ModelSizes, Recipe, VQStage
from .checkpoint import Diverged
from .trainer import Interrupted, Trainer, train

__all__ = ["DataSpec", "LMStage", "ModelSizes", "Recipe", "VQStage", "Diverged", "Interrupted", "Trainer", "train"]
