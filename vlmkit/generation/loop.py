"""The text generation loop, as gpt-fast's ``generate``, and every model's ``generate`` method:
``prefill`` the prompt, then one ``decode_one_token`` (decode.py) per step into a KV cache preallocated
for the whole answer.

Beside what decode.py's forwards use, the model provides ``new_cache(batch_size, max_len)`` and
``max_context`` (the longest sequence it takes). Each step's scores go through the logits pipeline
(logits.py) and rows stop as stopping.py decides; with ``num_beams > 1`` the same prefill hands over to
beam search (beam.py).
"""

import contextlib
import warnings

import torch

from ..errors import InputError
from ..nn.cpu_kernels import torch_ops_on_one_thread
from .beam import beam_search
from .config import GenerationConfig
from .decode import decode_one_token, prefill
from .logits import apply_processors, logits_processors
from .options import text_request
from .outputs import GenerateDecoderOnlyOutput
from .sampling import make_generator
from .text_guidance import TextGuidance
from .stopping import Stopping


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a padded batch as a model's forward makes them without ``position_ids``: real
    tokens count from 0, pads get 1 (transformers' IdeficsModel.forward)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a prompt to generate from, as transformers 5's generate makes them: real tokens count
    from 0, pads get 0. Each new token takes the last position + 1, so with right padding (the last
    position a pad's) the answer goes on from 1, as there."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def inferred_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The mask of a prompt given without one, as transformers' generate infers it: the pad token's places
    masked out when the prompt holds it and it is not an end token; all ones otherwise (as for ids that
    are not int32/int64, or with no pad token, which then falls back to the end token)."""
    ones = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    pad, eos = config.pad_token_id, config.eos_token_ids
    if pad is None or int(pad) in eos or input_ids.dtype not in (torch.int32, torch.int64):
        return ones
    padding = input_ids == int(pad)
    return (~padding).long() if bool(padding.any()) else ones


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
def generate(model, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
             streamer=None, tokenizer=None, **kwargs):
    """Text generation as transformers' ``generate`` (every model's ``generate`` method): returns prompt +
    new token ids [batch * num_return_sequences, T + n], or with ``return_dict_in_generate=True`` an output
    with ``.sequences`` (and ``.scores`` / ``.logits`` when ``output_scores`` / ``output_logits``).

    Generation options go by keyword with transformers' names and meaning: ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``min_new_tokens``,
    ``min_length``, ``bad_words_ids``, ``suppress_tokens``, ``begin_suppress_tokens``,
    ``no_repeat_ngram_size``, ``sequence_bias``, ``renormalize_logits``, ``num_beams``,
    ``length_penalty``, ``early_stopping``, ``num_return_sequences``, ``eos_token_id``,
    ``stop_strings`` (needs ``tokenizer``), ``seed``...; ``logits_processor`` and
    ``stopping_criteria`` take lists of transformers-style callables (``(input_ids, scores) -> scores``
    and ``-> bool [batch]``), run after the built-in ones. Other keywords are model inputs such as
    ``pixel_values``. ``streamer.put(tokens)`` / ``streamer.end()`` are called as tokens come. Once an
    end-of-sequence token is configured, finished rows are filled with the pad token, as the reference does.

    The story: ``prefill`` the prompt (in ``_start``), then each step picks every row's token and feeds it
    back with ``decode_one_token`` (decode.py), which runs the decoder (nn/decoder.py): its layers call
    the attention."""
    if input_ids is None and kwargs.get("inputs_embeds") is not None:
        raise InputError("generate(inputs_embeds=...) is not supported: vlmkit's generate starts from token ids; "
                         "pass the processor's input_ids (with pixel_values for the images) instead")
    request = text_request(model, input_ids, attention_mask, generation_config, streamer, tokenizer, kwargs)
    config, input_ids, attention_mask = request.config, request.input_ids, request.attention_mask
    with _ending(streamer):
        if attention_mask is None:
            attention_mask = inferred_attention_mask(input_ids, config)
        if not bool(attention_mask[:, -1].all()):
            warnings.warn("right-padding was detected in a batch to generate from: a padded row's new tokens "
                          "follow its padding; pad on the left for correct results (padding_side='left', as "
                          "transformers advises)", stacklevel=3)
        prompt_length = input_ids.shape[1]
        max_context = getattr(model, "max_context", None)
        budget = config.new_token_budget(prompt_length, max_context)
        check_context(prompt_length, budget, max_context)
        if budget == 0:
            sequences = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            return _wrap(config, sequences, (), ()) if config.return_dict_in_generate else sequences
        guidance = text_guidance(model, config, input_ids.shape[0], request.negative_prompt)
        # max_time's clock counts the prefill
        stops = Stopping(config, prompt_length, request.should_stop, request.stopping_criteria, request.end_token_ids)
        logits, input_ids, attention_mask, next_position, cache = _start(model, input_ids, attention_mask, config,
                                                                         budget, request.model_inputs)
        padding = padding_lengths(attention_mask) if config.repetition_penalty not in (None, 1.0) else None
        processors = logits_processors(config, prompt_length, padding, request.logits_processor,
                                       prompt_length + budget, guidance=guidance,
                                       vocab_size=model.config.get_text_config().vocab_size)
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
            with torch_ops_on_one_thread(logits):
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
            if request.on_tokens is not None:
                request.on_tokens(token)
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


@contextlib.contextmanager
def _ending(streamer):
    """``streamer.end()`` once generation stops, however it stops."""
    try:
        yield
    finally:
        if streamer is not None:
            streamer.end()


def _start(model, input_ids, attention_mask, config, budget: int, model_inputs: dict):
    """A cache for prompt + ``budget`` tokens and the prompt's ``prefill``, then each prompt's rows
    repeated for its beams or return sequences; (logits, input_ids, attention_mask, next positions, cache)."""
    batch, prompt_length = input_ids.shape
    cache = model.new_cache(batch, prompt_length + budget)
    positions = generation_positions(attention_mask)
    logits = prefill(model, input_ids, attention_mask, positions, cache, **model_inputs)
    copies = max(config.num_beams, config.num_return_sequences)
    if copies > 1:
        rows = torch.arange(batch, device=input_ids.device).repeat_interleave(copies)
        cache.select_rows(rows)
        logits, input_ids, positions = logits[rows], input_ids[rows], positions[rows]
        attention_mask = attention_mask[rows]
    return logits, input_ids, attention_mask, positions[:, -1:] + 1, cache


def text_guidance(model, config: GenerationConfig, prompts: int, negative_prompt: tuple) -> TextGuidance | None:
    """Classifier-free guidance over the text when ``config.guidance_scale`` asks for it, checked before the
    prefill; None for a model whose guidance is for images only (Janus: its checkpoints set a scale for
    image generation, which transformers' Janus leaves out of text generation too)."""
    if config.guidance_scale in (None, 1) or not getattr(model, "guides_text", True):
        return None
    return TextGuidance(config.guidance_scale, model, prompts, max(config.num_beams, config.num_return_sequences),
                        *negative_prompt)


def _wrap(config, sequences, all_scores, all_logits):
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=all_scores if config.output_scores else None,
                                     logits=all_logits if config.output_logits else None)


def padding_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's count of left-padding positions; None when nothing is padded (as the reference)."""
    if bool(attention_mask.bool().all()):
        return None
    return (attention_mask != 0).int().argmax(dim=1)
