"""The shapes world's part of a training run, plugged into the general trainer (``train.trainer``) when
a recipe's ``data.source`` is "shapes": the data source, the vision stage (every patch token predicts
what its object is), and the LM stage's training-only losses (patch labels, binding attention, what a
question names). The heads these losses train are never exported."""

from __future__ import annotations

import contextlib
import random

import torch

from .binding import ForwardRecord, binding_attention_loss, binding_layer, question_label_loss
from .label_heads import PATCH_LABELS, label_loss, label_tensors, patch_classes
from .source import shapes_source


class ShapesTraining:
    """The shapes-only stages and losses of one run of ``recipe`` on ``model`` (on ``device``)."""

    def __init__(self, recipe, model, device):
        self.recipe = recipe
        self.model = model
        self.device = device
        config = model.config
        self.source = shapes_source(recipe.data, config.vision_config.image_size,
                                    config.vq_config.downsampling_factor)
        lm = recipe.lm
        if lm.binding_attention_weight or lm.question_label_weight:
            binding_layer(lm, model)  # a bad layer or head fails now, not at the first LM step
        self.heads: dict[str, torch.nn.Linear | None] = {
            "vision_head": (self._label_head(config.vision_config.hidden_size)
                            if recipe.vision.steps or lm.patch_label_weight else None),
            "question_head": self._label_head(config.text_config.hidden_size) if lm.question_label_weight else None,
        }

    def _label_head(self, width: int) -> torch.nn.Linear:
        """A training-only classifier of ``PATCH_LABELS``' classes from ``width`` features: the vision
        stage's per patch token, ``lm.question_label_weight``'s per answer."""
        generator = torch.Generator().manual_seed(self.recipe.seed)
        classes = sum(len(values) + 1 for values in PATCH_LABELS.values())
        head = torch.nn.Linear(width, classes)
        with torch.no_grad():
            head.weight.normal_(0, 0.02, generator=generator)
            head.bias.zero_()
        return head.to(self.device)

    def vision_losses(self, image_processor, rng: random.Random, batch_size: int) -> dict:
        """The vision stage's step: each patch token of ``batch_size`` scenes predicts its object's labels."""
        vision = self.model.model.vision_model
        patch = self.model.config.vision_config.patch_size
        images, labels = zip(*(self.source.patch_example(rng, patch) for _ in range(batch_size)))
        pixels = image_processor(list(images))["pixel_values"].to(self.device)
        return label_loss(self.heads["vision_head"], vision(pixels), label_tensors(labels, self.device))

    def lm_parameters(self) -> list[torch.nn.Parameter]:
        """The heads the LM stage trains along with the model."""
        heads = (self.heads["vision_head"] if self.recipe.lm.patch_label_weight else None, self.heads["question_head"])
        return [p for head in heads if head is not None for p in head.parameters()]

    @contextlib.contextmanager
    def recording(self, model):
        """Around the understanding forward: keep the vision tower's output and, for the binding and
        question losses, the input of the binding layer's attention."""
        stage = self.recipe.lm
        attention = (ForwardRecord(model.text_model.layers[binding_layer(stage, model)].self_attn)
                     if stage.binding_attention_weight or stage.question_label_weight else contextlib.nullcontext())
        with ForwardRecord(model.model.vision_model) as vision, attention:
            yield vision, attention

    def understanding_losses(self, model, batch: dict, examples, recorded) -> tuple[dict, list]:
        """(values to log, [(weight, loss)] to add to the total) of the understanding batch's
        shapes-only losses, from what ``recording`` kept."""
        stage, (vision, attention) = self.recipe.lm, recorded
        logged, terms = {}, []
        if stage.patch_label_weight:
            config = model.config.vision_config
            labels = [patch_classes(e.scene, config.image_size, config.patch_size) for e in examples]
            patches = label_loss(self.heads["vision_head"], vision.output, label_tensors(labels, vision.output.device))
            logged.update({f"patch {name}": value for name, value in patches.items() if name != "loss"})
            terms.append((stage.patch_label_weight, patches["loss"]))
        if stage.binding_attention_weight:
            config = model.config.vision_config
            binding = binding_attention_loss(attention, stage.binding_attention_head, batch["input_ids"],
                                             batch["labels"], examples, model.config.image_token_id,
                                             config.image_size, config.patch_size)
            if binding is not None:
                logged["binding"] = binding
                terms.append((stage.binding_attention_weight, binding))
        if stage.question_label_weight:
            named = question_label_loss(self.heads["question_head"], attention, batch["labels"], examples)
            if named is not None:
                logged.update({f"named {name}": value for name, value in named.items() if name != "loss"})
                terms.append((stage.question_label_weight, named["loss"]))
        return logged, terms
