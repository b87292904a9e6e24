"""The shapes world's labels (what a patch shows, what a question names: ``PATCH_LABELS``' classes) and
the losses of the training-only linear heads that predict them."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .shapes import COLOURS, POSITIONS, SHAPES, Scene, patch_labels

# What each patch token is taught to tell (``patch_classes``), and each label's values; class 0 is the background.
PATCH_LABELS = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS}


def patch_classes(scene: Scene, image_size: int, patch: int) -> dict[str, list[int]]:
    """For each ``patch``-px cell of the scene's rendering (row by row) and each of ``PATCH_LABELS``,
    the class of the object the cell shows: 0 for background, else 1 + the index of the object's
    shape / colour / position (so a token also says where its object is, which its own place in
    the grid does not say by itself)."""
    cells = patch_labels(scene, image_size, patch)
    out = {}
    for name, values in PATCH_LABELS.items():
        classes = [0] + [1 + values.index(getattr(obj, name)) for obj in scene.objects]
        out[name] = [classes[c] for c in cells]
    return out


def named_classes(question: str) -> dict[str, int]:
    """For each of ``PATCH_LABELS``, the class of the value the question names ("Where is the red
    circle?": colour red, shape circle), 0 where it names none (or more than one)."""
    words = set(question.replace("?", " ").replace(".", " ").split())
    out = {}
    for name, values in PATCH_LABELS.items():
        named = [index for index, value in enumerate(values) if value in words]
        out[name] = 1 + named[0] if len(named) == 1 else 0
    return out


def label_loss(head: torch.nn.Module, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    """For each of ``PATCH_LABELS``, the cross-entropy of every feature's class ([B, N] in
    ``labels``), predicted by ``head`` (one block of logits per label, in that order) from ``features``
    [B, N, width] (the vision stage: the vision tower's patch tokens); ``loss`` is their sum."""
    logits = head(features)
    losses, start = {}, 0
    for name, values in PATCH_LABELS.items():
        block = logits[..., start:start + len(values) + 1]
        start += len(values) + 1
        losses[name] = F.cross_entropy(block.flatten(0, 1), labels[name].flatten())
    losses["loss"] = sum(losses.values())
    return losses


def label_tensors(examples: list[dict[str, list[int]]], device) -> dict[str, torch.Tensor]:
    """Per-example classes (``patch_classes``, ``named_classes`` in lists) as [B, N] tensors per label."""
    return {name: torch.tensor([e[name] for e in examples], device=device) for name in examples[0]}
