"""Sorting ``generate``'s keywords: generation options (into a ``GenerationConfig``), the user's
``logits_processor`` / ``stopping_criteria`` lists, and model inputs. A transformers option vlmkit
does not implement is an error naming it, never silently dropped."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from ..errors import InputError
from .config import GenerationConfig
from .option_types import check_token_ids_in_vocabulary
from .stopping import stop_strings_check
from .streaming import step_callback

OPTIONS = frozenset(f.name for f in fields(GenerationConfig)) - {"extra"}

# transformers options that change what is generated and that vlmkit does not implement, with the
# values that leave generation unchanged (passing those is fine): decoding methods transformers 5 moved to
# Hub repositories (group beams, contrastive search, DoLa, constrained beams), multi-GPU and multi-token
# prediction, and token healing (it re-tokenizes the decoded prompt, which drops a VLM's image tokens)
UNSUPPORTED = {
    "custom_generate": (None,), "synced_gpus": (None, False), "diversity_penalty": (None, 0.0),
    "num_beam_groups": (None, 1), "penalty_alpha": (None,), "dola_layers": (None,), "force_words_ids": (None,),
    "constraints": (None,), "token_healing": (None, False),
    "use_mtp": (None, False), "past_key_values": (None,), "decoder_start_token_id": (None,),
    "use_model_defaults": (None, True),
}

# transformers options that only choose how the work is done (caches, compilation, the settings of assisted
# decoding): the tokens are the same without them
NO_EFFECT = frozenset({"use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile",
                       "max_cache_len", "prefill_chunk_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
                       "assistant_confidence_threshold", "max_matching_ngram_size", "assistant_early_exit",
                       "assistant_lookbehind", "target_lookbehind"})

# what an option passed as None means in transformers 5's generate: unset over the checkpoint's value, so off
# (a filter skipped, no end token); the pad token then falls back to the end token, as there
SET_TO_NONE = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0,
               "eos_token_id": []}

# transformers' assisted decoding (a draft model, or n-grams looked up in the prompt): greedy, it gives the
# tokens of plain greedy decoding, which vlmkit runs; sampling through a draft draws differently, so there
# it is refused rather than answered with other tokens
ASSISTED_DECODING = ("assistant_model", "assistant_tokenizer", "prompt_lookup_num_tokens")


def split_generate_kwargs(base: GenerationConfig, generation_config, kwargs: dict):
    """(config, logits_processor, stopping_criteria, model-input kwargs) from ``generate``'s arguments.

    ``generation_config`` may be vlmkit's or transformers' ``GenerationConfig`` (the options it sets
    go over ``base``, the model's); keyword options go over both."""
    kwargs = dict(kwargs)
    logits_processor = list(kwargs.pop("logits_processor", None) or ())
    stopping_criteria = list(kwargs.pop("stopping_criteria", None) or ())
    for name, value in [("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)]:
        if not all(callable(item) for item in value):
            raise InputError(f"{name} must be a list of callables (input_ids, scores) -> ...")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
    unset_pad = "pad_token_id" in options and options["pad_token_id"] is None
    options.update({k: SET_TO_NONE[k] for k, v in options.items() if v is None and k in SET_TO_NONE})
    for name in NO_EFFECT:
        kwargs.pop(name, None)
    assisted = sorted(name for name in ASSISTED_DECODING if kwargs.pop(name, None) is not None)
    refuse_unsupported({k: kwargs.pop(k) for k in list(kwargs) if k in UNSUPPORTED}, "generate")
    if generation_config is None:
        config = base
    elif isinstance(generation_config, GenerationConfig):
        config = generation_config
    elif callable(getattr(generation_config, "to_dict", None)):  # transformers' GenerationConfig
        values = generation_config.to_dict()
        assisted += [name for name in ASSISTED_DECODING if values.get(name) is not None and name not in assisted]
        config = base.updated(**_transformers_options(values))
    else:
        raise InputError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
    warn_checkpoint_extras(config)
    config = config.updated(**options)
    if unset_pad and config.eos_token_ids:
        config = config.updated(pad_token_id=config.eos_token_ids[0])
    if assisted and (config.do_sample or config.num_beams > 1):
        raise InputError(f"generate: {', '.join(assisted)} (assisted decoding) works here with greedy decoding only, "
                         "which gives the tokens plain greedy decoding gives; with sampling or beams transformers "
                         "draws through the assistant, which vlmkit does not run: leave it out")
    return config, logits_processor, stopping_criteria, kwargs


def refuse_unsupported(options: dict, where: str) -> None:
    """An error naming every option in ``options`` set to a value vlmkit cannot honour."""
    bad = sorted(k for k, v in options.items() if not _neutral(k, v))
    if bad:
        raise InputError(f"{where}: vlmkit does not implement the generation option(s) {', '.join(bad)}; "
                         "leave them unset")


def warn_checkpoint_extras(config: GenerationConfig) -> None:
    """A warning for options the checkpoint's ``generation_config.json`` sets that vlmkit does not implement."""
    bad = sorted(k for k, v in config.extra.items() if k in UNSUPPORTED and not _neutral(k, v))
    if bad:
        warnings.warn(f"the checkpoint's generation config sets {', '.join(bad)}, which vlmkit does not implement; "
                      "generation goes on without them", stacklevel=4)


def _neutral(name: str, value) -> bool:
    return any(value is neutral or (neutral is not None and value == neutral) for neutral in UNSUPPORTED[name])


def _transformers_options(values: dict) -> dict:
    """The options a transformers ``GenerationConfig.to_dict()`` sets, checked."""
    values = {k: v for k, v in values.items() if v is not None and not k.startswith("_") and k != "transformers_version"}
    refuse_unsupported({k: v for k, v in values.items() if k in UNSUPPORTED}, "generation_config")
    return {k: v for k, v in values.items() if k in OPTIONS}


# options of text decoding that mean nothing to an image-token loop (Janus' generation_mode="image")
TEXT_ONLY = ("num_beams", "length_penalty", "early_stopping", "min_length", "min_new_tokens", "no_repeat_ngram_size",
             "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "renormalize_logits",
             "repetition_penalty", "stop_strings", "return_dict_in_generate", "output_scores", "output_logits",
             "logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn", "forced_bos_token_id",
             "forced_eos_token_id", "remove_invalid_values", "max_time", "exponential_decay_length_penalty",
             "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "watermarking_config",
             "negative_prompt_ids", "negative_prompt_attention_mask")


def refuse_text_only(options: dict, where: str) -> None:
    """An error naming the text-decoding options set in ``options`` (any value but the default), and
    the transformers options vlmkit does not implement."""
    defaults = GenerationConfig()
    bad = sorted(k for k, v in options.items() if k in TEXT_ONLY and v is not None
                 and not (k in OPTIONS and v == getattr(defaults, k)) and not (isinstance(v, (list, tuple)) and not v))
    if bad:
        raise InputError(f"{where} does not take the option(s) {', '.join(bad)}; they apply to text generation "
                         "(generation_mode='text')")
    refuse_unsupported({k: v for k, v in options.items() if k in UNSUPPORTED}, where)


@dataclass
class TextRequest:
    """A text ``generate`` call's arguments, checked and sorted: what the loop (loop.py) runs."""

    config: GenerationConfig
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    model_inputs: dict
    on_tokens: Callable[[torch.Tensor], None] | None  # the streamer's put
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None  # stop strings
    logits_processor: list
    stopping_criteria: list
    end_token_ids: list[int] | None = None  # a user's EosTokenCriteria: these end rows, not the config's
    negative_prompt: tuple = (None, None)  # text guidance's unconditional branch: (ids, attention mask)


def own_length_and_end_criteria(config: GenerationConfig, criteria: list):
    """(config, the other criteria, end token ids or None): a user's transformers ``MaxLengthCriteria``,
    ``EosTokenCriteria`` or ``MaxTimeCriteria`` takes the place of the built-in length limit, end check or
    time limit, as in transformers (its ``_merge_criteria_processor_list``), instead of adding to them."""
    others, end_ids = [], None
    for criterion in criteria:
        name = type(criterion).__name__ if type(criterion).__module__.startswith("transformers") else None
        if name == "MaxLengthCriteria":
            config = replace(config, max_length=int(criterion.max_length), max_new_tokens=None)
        elif name == "EosTokenCriteria":
            end_ids = [int(t) for t in torch.as_tensor(criterion.eos_token_id).reshape(-1)]
        elif name == "MaxTimeCriteria":
            config = replace(config, max_time=None)
            others.append(criterion)
        else:
            others.append(criterion)
    return config, others, end_ids


def check_prompt_tokens(model, input_ids, attention_mask) -> None:
    """A prompt the model can read: integer ids [batch, length] within its vocabulary, and a mask of the same
    shape; anything else is an error naming the fix (torch's own would come from deep inside the forward)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a tensor [batch, length] (got {shape}); pass the processor's output, "
                         f"or add the batch dimension: input_ids[None]")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InputError(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)}): give at least one "
                         f"prompt of at least one token, e.g. processor(text=...) with some text")
    limit = getattr(model, "token_id_count", None)
    if input_ids.numel() and limit is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= limit):
        raise InputError(f"input_ids hold ids outside the model's vocabulary of {limit} tokens (from "
                         f"{int(input_ids.min())} to {int(input_ids.max())}); tokenize with this checkpoint's processor")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")


def text_request(model, input_ids, attention_mask, generation_config, streamer, tokenizer, kwargs: dict) -> TextRequest:
    """``generate``'s arguments as a ``TextRequest`` on the model's device; an error naming the problem for
    a missing prompt, an option vlmkit does not implement, or a streamer with beam search."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)  # transformers' name for the first argument
    if input_ids is None:
        raise InputError("generate needs input_ids (call the processor first)")
    check_prompt_tokens(model, input_ids, attention_mask)
    negative_prompt = (kwargs.pop("negative_prompt_ids", None), kwargs.pop("negative_prompt_attention_mask", None))
    config, logits_processor, stopping_criteria, kwargs = split_generate_kwargs(
        model.generation_config, generation_config, kwargs)
    config.check_room(input_ids.shape[1])  # before a user's MaxLengthCriteria takes max_length's place
    check_token_ids_in_vocabulary(config, getattr(model, "token_id_count", None))
    config, stopping_criteria, end_token_ids = own_length_and_end_criteria(config, stopping_criteria)
    if streamer is not None and config.num_beams > 1:
        raise InputError("streaming is not possible with beam search (num_beams > 1): the best beam is only "
                         "known at the end")
    should_stop = stop_strings_check(config, tokenizer)
    model_inputs = model.model_inputs(**kwargs)
    on_tokens = step_callback(streamer, input_ids)
    return TextRequest(config, input_ids.to(model.device),
                       attention_mask.to(model.device) if attention_mask is not None else None,
                       model_inputs, on_tokens, should_stop, logits_processor, stopping_criteria, end_token_ids,
                       negative_prompt)
