"""Losses of the training-only linear heads that classify features into ``data.PATCH_LABELS``' classes
(what a patch shows, or what a question names)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .data import PATCH_LABELS


def label_loss(head: torch.nn.Module, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    """For each of ``data.PATCH_LABELS``, the cross-entropy of every feature's class ([B, N] in
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
