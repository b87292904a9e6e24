"""The two forwards of text generation, as gpt-fast's ``prefill`` and ``decode_one_token``: the prompt
once into a preallocated KV cache, then one token per row per step.

They take any family's model by what it provides (nothing here knows a family):
  ``embed_prompt(input_ids, cache, **model_inputs)`` -> prompt embeddings with the media written in
  ``text_model(embeds, position_ids, attention_mask, cache, last_position_only=False)`` -> hidden states
  (nn/decoder.py's DecoderModel; a prefill asks for the last position's alone)
  ``lm_logits(hidden)`` -> logits, and ``prompt_cache`` / ``media_token_ids`` for reusing a prompt's start
The text loop (loop.py), beam search (beam.py) and the server call these; the CFG image step is image_step.py."""

import torch

from ..io.memory import return_freed_memory
from .prompt_cache import media_digest

# prefills of at least this many rows hand their freed activations back to the system before decoding
LONG_PREFILL_ROWS = 256


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
            cache, **model_inputs) -> torch.Tensor:
    """Run the prompt ``input_ids`` [B, T] (with its media) into the empty ``cache``; the last position's
    logits [B, V]. A prefix the prompt cache holds for the same media is restored instead of recomputed (the
    whole prompt, with its logits, when it is one the cache holds)."""
    prompt_cache = model.prompt_cache
    use_prompt_cache = prompt_cache.applies(input_ids, attention_mask, cache)
    start, reused_ids = 0, None
    if use_prompt_cache:
        media = media_digest(model_inputs)
        start, reused_ids, logits = prompt_cache.restore(model, input_ids, media, cache)
        if logits is not None:  # this very prompt again: as it was the first time
            return logits
    if start and _media_all_reused(model, input_ids, start, reused_ids):
        embeds = model.text_model.embed_tokens(input_ids[:, start:])  # no media features needed
    else:
        embeds = model.embed_prompt(input_ids, cache, **model_inputs)[:, start:]
    mask = attention_mask[:, start:] if attention_mask is not None else None
    hidden = model.text_model(embeds, position_ids[:, start:], mask, cache, last_position_only=True)
    if embeds.shape[0] * embeds.shape[1] >= LONG_PREFILL_ROWS and embeds.device.type == "cpu":
        # a long prefill's activations are free now; glibc would keep them resident through the whole
        # decode (Janus-Pro-1B, one image: ~180 MB)
        return_freed_memory()
    logits = model.lm_logits(hidden[:, -1])
    if use_prompt_cache:
        prompt_cache.store(model, input_ids, media, cache, logits)
    return logits


def decode_one_token(model, token_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed each row one token ``token_ids`` [B, 1] at ``position_ids`` [B, 1]; the next logits [B, V].
    The decoder (nn/decoder.py) writes the new keys/values into ``cache`` in place."""
    text = model.text_model
    hidden = text(text.embed_tokens(token_ids), position_ids, None, cache)
    return model.lm_logits(hidden[:, -1])


def _media_all_reused(model, input_ids: torch.Tensor, start: int, reused_ids: torch.Tensor) -> bool:
    """Whether every media placeholder of the prompt lies in its first ``start`` (reused) positions, and
    the prompt that stored them had as many (so it checked them against the same media). A family that
    declares no ``media_token_ids`` always recomputes the whole prompt's embeddings."""
    if model.media_token_ids is None:
        return False
    ids = input_ids[0].cpu()
    placeholders = torch.tensor(model.media_token_ids)
    return (not bool(torch.isin(ids[start:], placeholders).any())
            and int(torch.isin(ids, placeholders).sum()) == int(torch.isin(reused_ids, placeholders).sum()))
