"""Padding token rows: the tokenizer call's (rows it just encoded) and ``tokenizer.pad`` (rows encoded
earlier, as a data collator hands them over), with transformers' rules for each key; the lengths that
``padding``/``truncation``/``max_length`` ask for."""

import numpy as np
import torch

from ..errors import InputError
from .features import BatchFeature, as_return_type

# what each key's rows are padded with (transformers' ``_pad``); "input_ids" takes the pad token, and keys
# not named here (labels, pixels...) are passed through as they are
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}


def pad_rows(rows: list[list[int]], length: int, side: str, pad_id: int | None) -> tuple[list, list]:
    """``rows`` padded to ``length`` with ``pad_id`` on ``side``; returns (ids, attention masks)."""
    pad_id = _checked_pad_id(pad_id, rows, length)
    return ([_padded(r, length, side, pad_id) for r in rows],
            [_padded([1] * len(r), length, side, 0) for r in rows])


def padding_and_truncation(padding, truncation, max_length: int | None, pad_to_multiple_of: int | None,
                           model_max_length: int | None) -> tuple:
    """(length to pad to: None, "longest" or a number; length to cut to: None or a number), as
    transformers' ``_get_padding_truncation_strategies`` works them out; ``model_max_length`` (the
    tokenizer's, None for unlimited) stands in for a ``max_length`` not given."""
    if max_length is not None and padding is False and truncation is None:
        truncation = True  # a max_length alone truncates, as in transformers
    if padding in (False, None, "do_not_pad"):
        pad_to = None
    elif padding in (True, "longest"):
        pad_to = "longest"
    elif padding == "max_length":
        pad_to = max_length if max_length is not None else model_max_length
    else:
        raise InputError(f"padding={padding!r}: use True/'longest', 'max_length' or False")
    if truncation in (False, None, "do_not_truncate"):
        cut_to = None
    elif truncation in (True, "longest_first", "only_first"):
        cut_to = max_length if max_length is not None else model_max_length
    else:
        raise InputError(f"truncation={truncation!r}: use True/'longest_first', 'only_first' or False")
    if cut_to is not None and pad_to is not None and pad_to_multiple_of and cut_to % pad_to_multiple_of:
        raise InputError(f"truncation to {cut_to} tokens and padding to a multiple of {pad_to_multiple_of} "
                         f"cannot both hold; make max_length a multiple of pad_to_multiple_of")
    return pad_to, cut_to


def pad_length(pad_to, rows: list, pad_to_multiple_of: int | None) -> int:
    """The length ``rows`` are padded to: ``pad_to`` (a number, or "longest": the longest row's), rounded up
    to a multiple of ``pad_to_multiple_of``."""
    target = max(len(r) for r in rows) if pad_to == "longest" else pad_to
    return -(-target // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else target


def _padded(row: list, length: int, side: str, value) -> list:
    """``row`` filled with ``value`` up to ``length`` (a longer row is left as it is, as transformers')."""
    fill = [value] * (length - len(row))
    return fill + row if side == "left" else row + fill


def pad_encoded(tokenizer, encoded_inputs, padding=True, max_length=None, pad_to_multiple_of=None,
                padding_side=None, return_attention_mask=None, return_tensors=None) -> BatchFeature:
    """transformers' ``tokenizer.pad``: ``encoded_inputs`` is one example's features, a dict of rows, or a
    list of examples (dicts); input ids, attention masks, token type ids and special-token masks are
    padded as ``padding`` says (True/"longest", "max_length", False), on ``padding_side``."""
    if isinstance(encoded_inputs, (list, tuple)):
        if not encoded_inputs or not all(isinstance(e, dict) for e in encoded_inputs):
            raise InputError("tokenizer.pad takes a dict of features or a non-empty list of them")
        encoded_inputs = {key: [e[key] for e in encoded_inputs] for key in encoded_inputs[0]}
    if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
        raise InputError(f"tokenizer.pad needs input_ids in what it pads; got {list(encoded_inputs or [])}")
    if return_tensors is None:  # tensors in, tensors out (as transformers infers it)
        ids = encoded_inputs["input_ids"]
        first = ids[0] if isinstance(ids, (list, tuple)) and len(ids) else ids
        return_tensors = "pt" if isinstance(first, torch.Tensor) else "np" if isinstance(first, np.ndarray) else None
    features = {k: _as_list(v) for k, v in dict(encoded_inputs).items()}
    single = bool(features["input_ids"]) and not isinstance(features["input_ids"][0], (list, tuple))
    if single or not features["input_ids"]:
        features = {k: [v] for k, v in features.items()}
    rows = [list(r) for r in features["input_ids"]]
    pad_to, _ = padding_and_truncation(padding, None, max_length, pad_to_multiple_of, tokenizer.known_max_length)
    side = padding_side or tokenizer.padding_side
    wants_mask = return_attention_mask if return_attention_mask is not None else \
        "attention_mask" in tokenizer.model_input_names
    if wants_mask and "attention_mask" not in features:
        features["attention_mask"] = [[1] * len(r) for r in rows]
    elif not wants_mask:
        features.pop("attention_mask", None)
    if pad_to is not None and rows:
        target = pad_length(pad_to, rows, pad_to_multiple_of)
        pad_id = _checked_pad_id(tokenizer.pad_token_id, rows, target)
        features["input_ids"] = [_padded(r, target, side, pad_id) for r in rows]
        for key, value in PAD_VALUES.items():
            if key in features:
                features[key] = [_padded(list(r), target, side, value) for r in features[key]]
    if single:
        features = {k: v[0] for k, v in features.items()}
    return as_return_type(BatchFeature(features), return_tensors)


def _as_list(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (torch.Tensor, np.ndarray)):
        return [v.tolist() for v in value]
    return value


def _checked_pad_id(pad_id: int | None, rows: list, length: int) -> int:
    """The pad token's id; without one, rows that need no padding pass and others are an error."""
    if pad_id is None and any(len(r) < length for r in rows):
        raise InputError("this tokenizer has no pad token, so rows of different lengths cannot be padded to one "
                         "length; set one first (tokenizer.pad_token = tokenizer.eos_token)")
    return 0 if pad_id is None else pad_id
