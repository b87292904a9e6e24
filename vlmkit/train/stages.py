"""One optimisation step of each stage: the VQ-VAE's losses, and the joint LM's two losses.

The VQ stage quantises L2-normalised latents to L2-normalised codes, as DeepSeek's VQ does and as
``JanusVQVAE.decode`` assumes (it normalises the looked-up codes): reconstruction (MSE + L1) through
a straight-through estimator, plus codebook and commitment terms. Codes that go unused are restarted
at random latents of the current batch, so the codebook does not collapse."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random

import torch
from torch.nn import functional as F

from ..models.base import causal_lm_loss
from .batches import IGNORE, generation_batch, generation_inputs, understanding_batch


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def random_crops(pixel_values: torch.Tensor, size: int, grid: int, rng: random.Random) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image, its corner on multiples of ``grid`` (the VQ's
    downsampling factor), so crops cut the latent grid where whole images do."""
    side = pixel_values.shape[-1]
    if size % grid or size > side:
        from ..errors import InputError
        raise InputError(f"vq.crop_size must be a multiple of {grid} and at most the image size {side}")
    corners = [(rng.randrange(0, side - size + 1, grid), rng.randrange(0, side - size + 1, grid))
               for _ in range(len(pixel_values))]
    return torch.stack([p[:, y:y + size, x:x + size] for p, (y, x) in zip(pixel_values, corners)])


def foreground_mask(pixel_values: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """[B, 1, H, W]: 1 where a pixel differs from its image's median border colour (the background)."""
    border = torch.cat([pixel_values[..., 0, :], pixel_values[..., -1, :], pixel_values[..., :, 0],
                        pixel_values[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return ((pixel_values - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def unit_latents(vq, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(latents as unit rows [B*H*W, C], the unit-length codebook, the latent grid's [B, C, H, W] shape):
    the VQ quantises on the unit sphere, so the nearest code has the largest dot product."""
    latents = vq.latents(pixel_values)
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)
    return flat, F.normalize(vq.quantize.embedding.weight, dim=-1), latents.shape


def vq_losses(vq, pixel_values: torch.Tensor, commitment: float,
              foreground_weight: float = 0.0) -> tuple[dict, torch.Tensor]:
    """(losses, code ids used) for a batch of images [B, 3, H, W] in the processor's range.
    ``foreground_weight`` up-weights the reconstruction error off the background: flat scenes are
    mostly background, and the colour of a small shape otherwise hardly moves the loss."""
    flat, codebook, (batch, channels, height, width) = unit_latents(vq, pixel_values)
    with torch.no_grad():
        codes = (flat @ codebook.t()).argmax(dim=1)
    quantized = codebook[codes]
    codebook_loss = F.mse_loss(quantized, flat.detach())
    commitment_loss = F.mse_loss(flat, quantized.detach())
    straight_through = flat + (quantized - flat).detach()
    grid = straight_through.view(batch, height, width, channels).permute(0, 3, 1, 2)
    reconstruction = vq.decoder(vq.post_quant_conv(grid))
    weight = 1 + foreground_weight * foreground_mask(pixel_values)
    mse = (weight * (reconstruction - pixel_values).pow(2)).mean()
    l1 = (weight * (reconstruction - pixel_values).abs()).mean()
    total = mse + l1 + codebook_loss + commitment * commitment_loss
    return {"loss": total, "mse": mse, "codebook": codebook_loss, "commitment": commitment_loss}, codes


@torch.no_grad()
def restart_dead_codes(vq, usage: torch.Tensor, pixel_values: torch.Tensor, generator: torch.Generator,
                       worst_served: bool = False) -> int:
    """Move codes unused since the last restart onto latents of this batch; returns how many.
    ``worst_served`` picks latents with probability proportional to their distance from the nearest
    code, instead of uniformly: in flat scenes most latents are background, so uniform restarts put
    most new codes there while edges stay under-served. (With whole-picture encoding a background
    patch still spreads over many interchangeable codes, since its latent depends on the rest of the
    picture; patchwise encoding is what gives it one.)"""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    flat, codebook, _ = unit_latents(vq, pixel_values)
    if worst_served:
        distance = (1 - (flat @ codebook.t()).amax(dim=1)).clamp_min(0) + 1e-6
        dead = dead[:len(flat)]
        picks = torch.multinomial(distance.cpu(), len(dead), replacement=False, generator=generator)
    else:
        picks = torch.randint(len(flat), (len(dead),), generator=generator)
    noise = 0.01 * torch.randn(len(dead), flat.shape[1], generator=generator)
    vq.quantize.embedding.weight[dead.to(flat.device)] = flat[picks.to(flat.device)] + noise.to(flat.device)
    return len(dead)


def object_weighted_loss(logits: torch.Tensor, labels: torch.Tensor, image_tokens: torch.Tensor,
                         object_weight: float) -> torch.Tensor:
    """Next-token cross-entropy over the image tokens, a weighted mean: tokens other than their row's
    most common code (its background) weigh ``object_weight``, the rest 1."""
    background = image_tokens.mode(dim=1).values[:, None]
    weights = torch.where(labels == background, 1.0, object_weight)
    return causal_lm_loss(logits, labels, IGNORE, weights)


def caption_recall_loss(model, hidden: torch.Tensor, prompt_lengths: list[int], num_tokens: int,
                        caption_ids: list[list[int]]) -> torch.Tensor | None:
    """Mean cross-entropy of each row's caption words (the target: their frequencies) predicted by the
    text head from the hidden state at every position that predicts an image token; rows without a
    caption (dropped for CFG) are skipped. None when no row has one."""
    rows = [i for i, words in enumerate(caption_ids) if words]
    if not rows:
        return None
    starts = torch.tensor([prompt_lengths[i] - 1 for i in rows], device=hidden.device)
    positions = starts[:, None] + torch.arange(num_tokens, device=hidden.device)
    states = hidden[torch.tensor(rows, device=hidden.device)[:, None], positions]  # [rows, tokens, hidden]
    log_probs = model.lm_logits(states).float().log_softmax(-1)
    target = torch.zeros(len(rows), log_probs.shape[-1], device=hidden.device)
    for row, i in enumerate(rows):  # a word said twice counts twice
        words = torch.tensor(caption_ids[i], device=hidden.device)
        target[row].index_add_(0, words, torch.ones(len(words), device=hidden.device))
    target = target / target.sum(-1, keepdim=True)
    return -(log_probs * target[:, None]).sum(-1).mean()


@torch.no_grad()
def image_embeddings_from_codebook(model) -> None:
    """Set the LM's image-token input embeddings to the VQ's codes at unit length (as decoding sees
    them): tokens that look alike (the same colour, say) then start out alike."""
    codebook = model.model.vqmodel.quantize.embedding.weight
    model.model.generation_embeddings.weight.copy_(F.normalize(codebook, dim=-1))


class ImageTokenCache:
    """The frozen VQ-VAE's tokens for images already seen, keyed by their pixels: generation pictures
    repeat (the shapes world's canonical pictures are a few thousand; a JSONL file's are fixed), and
    encoding was a quarter of an LM step. Each new image is encoded on its own, so its tokens never
    depend on the rest of the batch or on what the cache holds (a resumed run starts empty)."""

    def __init__(self, vq, max_entries: int = 100_000):
        self.vq = vq
        self.max_entries = max_entries
        self.tokens: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, device) -> torch.Tensor:
        rows = []
        for image in pixel_values:
            key = hashlib.sha1(image.numpy().tobytes()).digest()
            tokens = self.tokens.get(key)
            if tokens is None:
                tokens = self.vq.encode(image[None].to(device))[0]
                if len(self.tokens) < self.max_entries:
                    self.tokens[key] = tokens
            rows.append(tokens)
        return torch.stack(rows)


def lm_losses(model, processor, source, rng: random.Random, stage, easy: bool = False,
              device: torch.device | str = "cpu", image_tokens: ImageTokenCache | None = None,
              auxiliary=None) -> dict:
    """Understanding and generation losses for one step's batches (either may be absent), computed on
    ``device`` (the model's); ``image_tokens`` encodes generation pictures (default: a throwaway cache).
    ``auxiliary``: training-only losses on the understanding batch (the shapes world's,
    ``builtin.training.ShapesTraining``): ``recording(model)`` wraps the forward, and
    ``understanding_losses(model, batch, examples, recorded)`` gives (values to log, [(weight, loss)])."""
    losses = {}
    understanding = [e for e in (source.understanding(rng, easy) for _ in range(stage.understanding_batch)) if e]
    generation = [e for e in (source.generation(rng) for _ in range(stage.generation_batch)) if e]
    total = 0.0
    if understanding:
        batch = {k: v.to(device) for k, v in understanding_batch(processor, understanding).items()}
        with auxiliary.recording(model) if auxiliary is not None else contextlib.nullcontext() as recorded:
            losses["understanding"] = model(**batch).loss
        total = total + losses["understanding"]
        if auxiliary is not None:
            logged, terms = auxiliary.understanding_losses(model, batch, understanding, recorded)
            losses.update(logged)
            for weight, value in terms:
                total = total + weight * value
    if generation:
        batch = generation_batch(processor, generation, rng, stage.caption_dropout)
        tokens = (image_tokens or ImageTokenCache(model.model.vqmodel))(batch["pixel_values"], device)
        inputs = generation_inputs(model, [p.to(device) for p in batch["prompts"]], tokens)
        if stage.object_token_weight == 1.0:
            output = model(**inputs, generation_mode="image")
            losses["generation"] = output.loss
        else:
            output = model(inputs_embeds=inputs["inputs_embeds"], generation_mode="image")
            losses["generation"] = object_weighted_loss(output.logits, inputs["labels"], tokens,
                                                        stage.object_token_weight)
        total = total + stage.generation_loss_weight * losses["generation"]
        if stage.caption_recall_weight:
            recall = caption_recall_loss(model, output.last_hidden_state, [len(p) for p in batch["prompts"]],
                                         tokens.shape[1], batch["caption_ids"])
            if recall is not None:
                losses["caption recall"] = recall
                total = total + stage.caption_recall_weight * recall
    losses["loss"] = total
    return losses
