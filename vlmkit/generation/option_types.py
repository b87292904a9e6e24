"""Type checks of generation options given by keyword (``generate(max_new_tokens="4")``): an option of the
wrong type is an error naming it, instead of a TypeError from deep inside torch. What transformers' generate
takes is still taken: numpy numbers, bools where a number goes, ints where a float goes, a fractional
``max_new_tokens`` / ``max_length`` (the answer then stops at the next whole length, as there) and token ids
written as whole floats (``3.0``) or as integer tensors."""

import numbers
import operator

import torch

from ..errors import InputError

# options transformers compares with numbers or scales scores by
REAL_OPTIONS = ("temperature", "top_p", "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "min_p",
                "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "guidance_scale", "max_time")

# counts used as tensor sizes or repeat counts, which must be whole numbers
WHOLE_OPTIONS = ("num_beams", "num_return_sequences")

TOKEN_ID_OPTIONS = ("bos_token_id", "pad_token_id", "forced_bos_token_id")
TOKEN_IDS_OPTIONS = ("eos_token_id", "forced_eos_token_id")  # these also take a list of ids


def check_option_types(config) -> None:
    """An InputError naming the first option of ``config`` whose type cannot work."""
    for name in REAL_OPTIONS:
        _require_real(name, getattr(config, name))
    _require_real("max_new_tokens", config.max_new_tokens)
    if config.max_new_tokens is None:  # max_new_tokens takes precedence: max_length is not read then
        _require_real("max_length", config.max_length)
    for name in WHOLE_OPTIONS:
        if not is_whole(getattr(config, name)):
            raise InputError(f"{name} must be a whole number, got {getattr(config, name)!r}")
    if config.do_sample and config.top_k not in (None, 0) and not (is_whole(config.top_k) and config.top_k > 0):
        # transformers' TopKLogitsWarper refuses these when sampling; unread without sampling, as there
        raise InputError(f"top_k must be a whole number > 0 when sampling (0 or None: no top-k filter), "
                         f"got {config.top_k!r}")
    for name in TOKEN_ID_OPTIONS + TOKEN_IDS_OPTIONS:
        value = getattr(config, name)
        ids = token_id_list(value)
        single = not isinstance(value, (list, tuple)) and len(ids) == 1
        if value is not None and not ((single or name in TOKEN_IDS_OPTIONS) and all(map(_is_token_id, ids))):
            kind = "a token id (a whole number) or a list of them" if name in TOKEN_IDS_OPTIONS else "a token id"
            raise InputError(f"{name} must be {kind}, got {value!r}")


def token_id_list(value) -> list:
    """A token-id option as a list of its values: [] for None, a tensor's elements, a list's items."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return [value]  # refused by the check as it is
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_token_ids_in_vocabulary(config, vocabulary: int | None) -> None:
    """``forced_eos_token_id`` within the model's vocabulary: transformers indexes the scores with it (a
    raw IndexError past the end, a ValueError below 0)."""
    ids = [int(t) for t in token_id_list(config.forced_eos_token_id)]
    bad = [t for t in ids if t < 0 or (vocabulary is not None and t >= vocabulary)]
    if bad:
        limit = f"the model's vocabulary of {vocabulary} tokens (ids 0 to {vocabulary - 1})" if vocabulary \
            else "the ids from 0"
        raise InputError(f"forced_eos_token_id {bad} is outside {limit}; pass the id of the end token, e.g. "
                         "processor.tokenizer.eos_token_id")


def is_whole(value) -> bool:
    """An int, bool or numpy integer (what can size a tensor)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _require_real(name: str, value) -> None:
    if value is not None and not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def _is_token_id(value) -> bool:
    return is_whole(value) or (isinstance(value, numbers.Real) and float(value).is_integer())
