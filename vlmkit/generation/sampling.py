"""Turning one step's logits into the next token outside ``generate``'s loop (the server's batched
steps, Janus' image tokens): temperature, top-k, top-p, then argmax or a draw from a seeded
generator (penalties and bans run before, in the logits pipeline). The processors are the logits pipeline's (logits.py), so the order and semantics
are transformers'."""

import torch

from .config import GenerationConfig
from .logits import apply_processors, sampling_warpers

# A temperature below this samples greedily (the server's rule, the CLI's and Engine's): dividing float32
# logits by less overflows them to inf and the softmax to nan, and the draw would be the argmax anyway.
GREEDY_BELOW = 1e-5


def warp_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), min-p and typical filtering for sampling."""
    return apply_processors(sampling_warpers(config), None, logits)


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token id per row of ``logits`` [batch, vocab] (float32 math for stable sampling)."""
    logits = logits.float()
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
