"""The text generation loop, as gpt-fast's ``generate``: ``prefill`` the prompt, then one
``decode_one_token`` (decode.py) per step into a KV cache preallocated for the whole answer.

Beside what decode.py's forwards use, the model provides ``new_cache(batch_size, max_len)`` and
``max_context`` (the longest sequence it takes). Each step's scores go through the logits pipeline
(logits.py) and rows stop as stopping.py decides; with ``num_beams > 1`` the same prefill hands over to
beam search (beam.py).
"""

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from .beam import beam_search
from .config import GenerationConfig
from .decode import decode_one_token, prefill
from .logits import LogitsProcessor, apply_processors, logits_processors
from .outputs import GenerateDecoderOnlyOutput
from .sampling import make_generator
from .stopping import Stopping


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


StoppingCriterion = Callable[..., torch.Tensor | bool]


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    config: GenerationConfig, model_inputs: dict | None = None,
                    on_tokens: Callable[[torch.Tensor], None] | None = None,
                    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    logits_processor: Sequence[LogitsProcessor] = (),
                    stopping_criteria: Sequence[StoppingCriterion] = ()):
    """Generate after ``input_ids`` [batch, T]; returns prompt + new tokens [batch * num_return_sequences, T + n]
    (with ``config.return_dict_in_generate``: a ``GenerateDecoderOnlyOutput``, or the beam search output).
    Greedy decoding or sampling, one token per row per step, each step one ``decode_one_token``.

    ``on_tokens`` receives each step's tokens (for streaming); ``should_stop(new_tokens)`` may flag rows
    as finished (stop strings). ``logits_processor``: callables ``(input_ids, scores) -> scores`` run
    after the built-in ones; ``stopping_criteria``: callables ``(input_ids, scores) -> bool [batch]``
    (transformers' shapes). Once an end-of-sequence token is configured, finished rows are filled with
    the pad token, as the reference does."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_length = input_ids.shape[1]
    max_context = getattr(model, "max_context", None)
    budget = config.new_token_budget(prompt_length, max_context)
    check_context(prompt_length, budget, max_context)
    if budget == 0:
        sequences = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        return _wrap(config, sequences, (), ()) if config.return_dict_in_generate else sequences
    stops = Stopping(config, prompt_length, should_stop, stopping_criteria)  # max_time's clock counts the prefill
    logits, input_ids, attention_mask, next_position, cache = _start(model, input_ids, attention_mask, config,
                                                                     budget, model_inputs or {})
    padding = padding_lengths(attention_mask) if config.repetition_penalty not in (None, 1.0) else None
    processors = logits_processors(config, prompt_length, padding, logits_processor, prompt_length + budget)
    if config.num_beams > 1:
        return beam_search((model, next_position, cache), logits, input_ids, config, budget, processors, stops)

    # everything the loop writes is allocated here, once
    rows, device = input_ids.shape[0], input_ids.device
    sequences = torch.empty(rows, prompt_length + budget, dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    pads = torch.full((rows,), pad, dtype=torch.long, device=device)
    keep_scores = config.return_dict_in_generate and config.output_scores
    keep_logits = config.return_dict_in_generate and config.output_logits
    all_scores, all_logits = (), ()
    generator = make_generator(config.seed, device)
    length = prompt_length
    for index in range(budget):
        logits = logits.float()
        scores = apply_processors(processors, sequences[:, :length], logits) if processors else logits
        if keep_scores:
            all_scores += (scores,)
        if keep_logits:
            all_logits += (logits,)
        if config.do_sample:
            token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        else:
            token = scores.argmax(dim=-1)
        if stops.eos.numel():
            token = torch.where(unfinished, token, pads)
        sequences[:, length] = token
        length += 1
        if on_tokens is not None:
            on_tokens(token)
        done = stops(sequences[:, :length], all_scores if keep_scores else None, token)
        if done is not None:
            unfinished &= ~done
        if index == budget - 1 or not bool(unfinished.any()):
            break
        logits = decode_one_token(model, token[:, None], next_position, cache)
        next_position += 1
    if config.return_dict_in_generate:
        return _wrap(config, sequences[:, :length], all_scores, all_logits)
    return sequences[:, :length]


def _start(model, input_ids, attention_mask, config, budget: int, model_inputs: dict):
    """A cache for prompt + ``budget`` tokens and the prompt's ``prefill``, then each prompt's rows
    repeated for its beams or return sequences; (logits, input_ids, attention_mask, next positions, cache)."""
    batch, prompt_length = input_ids.shape
    cache = model.new_cache(batch, prompt_length + budget)
    positions = prompt_positions(attention_mask)
    logits = prefill(model, input_ids, attention_mask, positions, cache, **model_inputs)
    copies = max(config.num_beams, config.num_return_sequences)
    if copies > 1:
        rows = torch.arange(batch, device=input_ids.device).repeat_interleave(copies)
        cache.select_rows(rows)
        logits, input_ids, positions = logits[rows], input_ids[rows], positions[rows]
        attention_mask = attention_mask[rows]
    return logits, input_ids, attention_mask, positions[:, -1:] + 1, cache


def _wrap(config, sequences, all_scores, all_logits):
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=all_scores if config.output_scores else None,
                                     logits=all_logits if config.output_logits else None)


def padding_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's count of left-padding positions; None when nothing is padded (as the reference)."""
    if bool(attention_mask.bool().all()):
        return None
    return (attention_mask != 0).int().argmax(dim=1)
