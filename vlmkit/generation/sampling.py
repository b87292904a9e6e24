"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p, then argmax or
a draw from a seeded generator. Same order and semantics as transformers' processors."""

import torch

from .config import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in ``seen_ids`` [batch, len] less likely (divide positive, multiply negative)."""
    scores = logits.gather(1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen_ids, scores)


def warp_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering for sampling."""
    if config.temperature not in (None, 1.0):
        logits = logits / config.temperature
    if config.top_k:
        k = min(config.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None,
               seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id per row of ``logits`` [batch, vocab] (float32 math for stable sampling)."""
    logits = logits.float()
    if seen_ids is not None and config.repetition_penalty not in (None, 1.0):
        logits = apply_repetition_penalty(logits, seen_ids, config.repetition_penalty)
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded for reproducible sampling, or None to use torch's global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator
