"""The text decoding loop: one prefill, then one small forward per token into a preallocated KV cache.

It works on any model that provides (families implement these; nothing here knows a family):
  ``new_cache(batch_size, max_len)``                       -> KVCache
  ``prefill(input_ids, attention_mask, position_ids, cache, **model_inputs)`` -> last-position logits [B, V]
  ``decode(token_ids [B, 1], position_ids [B, 1], cache)`` -> logits [B, V]
  ``max_context``                                          -> the longest sequence the model takes
"""

from collections.abc import Callable

import torch

from ..errors import InputError
from .config import GenerationConfig
from .sampling import make_generator, next_token


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: real tokens count from 0, pads get 1 (as the reference)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def check_context(prompt_length: int, new_tokens: int, max_context: int | None) -> None:
    """A clear error when the prompt (plus what is asked to generate) does not fit the model."""
    if max_context is None:
        return
    if prompt_length > max_context:
        raise InputError(f"the prompt is {prompt_length} tokens long, longer than the model's context of "
                         f"{max_context} tokens; shorten it or use fewer images")
    if prompt_length + new_tokens > max_context:
        raise InputError(f"the prompt ({prompt_length} tokens) plus max_new_tokens ({new_tokens}) exceeds the "
                         f"model's context of {max_context} tokens; lower max_new_tokens")


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    config: GenerationConfig, model_inputs: dict | None = None,
                    on_tokens: Callable[[torch.Tensor], None] | None = None,
                    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Generate after ``input_ids`` [batch, T]; returns prompt + new tokens [batch * num_return_sequences, T + n].

    ``on_tokens`` receives each step's tokens (for streaming); ``should_stop(new_tokens)`` may flag rows
    as finished (stop strings). Finished rows are filled with the pad token, as the reference does."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, prompt_length = input_ids.shape
    budget = config.new_token_budget(prompt_length)
    check_context(prompt_length, budget, getattr(model, "max_context", None))
    copies = config.num_return_sequences
    if budget == 0:
        return input_ids.repeat_interleave(copies, dim=0)

    cache = model.new_cache(batch, prompt_length + budget)
    positions = prompt_positions(attention_mask)
    logits = model.prefill(input_ids, attention_mask, positions, cache, **(model_inputs or {}))
    if copies > 1:
        rows = torch.arange(batch, device=input_ids.device).repeat_interleave(copies)
        cache.select_rows(rows)
        logits, input_ids, positions = logits[rows], input_ids[rows], positions[rows]

    device = input_ids.device
    sequences = torch.empty(input_ids.shape[0], prompt_length + budget, dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    next_position = positions[:, -1:] + 1
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    generator = make_generator(config.seed, device)
    length = prompt_length
    for step in range(budget):
        token = next_token(logits, config, generator, seen_ids=sequences[:, :length])
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        sequences[:, length] = token
        length += 1
        if on_tokens is not None:
            on_tokens(token)
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
        if should_stop is not None:
            unfinished &= ~should_stop(sequences[:, prompt_length:length])
        if step == budget - 1 or not bool(unfinished.any()):
            break
        logits = model.decode(token[:, None], next_position, cache)
        next_position = next_position + 1
    return sequences[:, :length]


def stop_string_checker(tokenizer, stop_strings: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``should_stop`` for ``generate_tokens``: rows whose generated text contains a stop string."""
    longest = max(len(s) for s in stop_strings)

    def should_stop(new_tokens: torch.Tensor) -> torch.Tensor:
        # decode only a tail long enough to hold the longest stop string
        tail = new_tokens[:, -max(longest, 8):].tolist()
        hits = [any(s in tokenizer.decode(row) for s in stop_strings) for row in tail]
        return torch.tensor(hits, dtype=torch.bool, device=new_tokens.device)

    return should_stop
