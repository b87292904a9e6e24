"""``resize_token_embeddings`` with transformers' meaning, so fine-tuning code that adds tokens runs as it is:
the first rows are kept, added rows are drawn from a normal distribution with the old rows' mean and (scaled)
covariance, or N(0, initializer_range) with ``mean_resizing=False``; an untied LM head is resized the same
way; the configs' ``vocab_size`` follows. The random draws are made in transformers' order, so after the same
``torch.manual_seed`` both libraries give the same weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import MultivariateNormal, constraints

from ..errors import InputError
from ..nn.layers import Linear

# transformers' scale of the old rows' covariance for the added rows: they stay close to the mean
_COVARIANCE_SCALE = 1e-9


def resize_token_embeddings(model, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                            mean_resizing: bool = True) -> nn.Embedding:
    """Resize ``model``'s token embedding (and its LM head) to ``new_num_tokens`` rows, rounded up to a
    multiple of ``pad_to_multiple_of``; returns the embedding module. Neither given: nothing changes."""
    embedding = model.get_input_embeddings()
    if new_num_tokens is None and pad_to_multiple_of is None:
        return embedding
    for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"resize_token_embeddings: {name} must be a positive integer, got {value!r}")
    model.refuse_resize()
    head = model.get_output_embeddings()
    if not (isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear)
            and embedding.weight.is_floating_point() and head.weight.is_floating_point()):
        raise InputError("resize_token_embeddings needs the token embedding and LM head unquantized: load the "
                         "model without quantization_config, resize it and save_pretrained, then load that "
                         "folder quantized")
    size = embedding.weight.shape[0] if new_num_tokens is None else new_num_tokens
    if pad_to_multiple_of is not None:
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    std = _initializer_range(getattr(model, "checkpoint_config", None) or {})

    old_rows = embedding.weight.shape[0]
    if size != old_rows:
        fresh = nn.Embedding(size, embedding.embedding_dim, device=embedding.weight.device,
                             dtype=embedding.weight.dtype)
        _fill_added_rows(fresh.weight, embedding.weight, mean_resizing, std)
        kept = min(size, old_rows)
        fresh.weight.data[:kept] = embedding.weight.data[:kept]
        embedding.weight.data = fresh.weight.data  # the same parameter: a head tied to it follows
        embedding.num_embeddings = size
        if embedding.padding_idx is not None and embedding.padding_idx >= size:
            embedding.padding_idx = None
    if head.weight.shape[0] != size:  # an untied head
        model.set_output_embeddings(_resized_head(head, size, mean_resizing, std))
    _set_vocab_size(model, size)
    model.tie_weights()
    return embedding


def _resized_head(head: nn.Linear, size: int, mean_resizing: bool, std: float) -> Linear:
    fresh = Linear(head.in_features, size, bias=head.bias is not None, device=head.weight.device,
                   dtype=head.weight.dtype)
    _fill_added_rows(fresh.weight, head.weight, mean_resizing, std)
    added = size - head.weight.shape[0]
    if head.bias is not None and added > 0:
        if mean_resizing:
            old_bias = head.bias.data
            fresh.bias.data[-added:].normal_(mean=float(old_bias.float().mean()),
                                             std=_COVARIANCE_SCALE * float(old_bias.std().float()))
        else:
            fresh.bias.data[-added:] = 0
    kept = min(size, head.weight.shape[0])
    fresh.weight.data[:kept] = head.weight.data[:kept]
    if head.bias is not None:
        fresh.bias.data[:kept] = head.bias.data[:kept]
    fresh.requires_grad_(head.weight.requires_grad)
    return fresh


def _fill_added_rows(fresh: torch.Tensor, old: torch.Tensor, mean_resizing: bool, std: float) -> None:
    """Draw the rows of ``fresh`` past ``old``'s (transformers' order of random draws: the whole new matrix
    when initializing, then the added rows)."""
    added = fresh.shape[0] - old.shape[0]
    if added <= 0:
        return
    if not mean_resizing:
        fresh.data.normal_(mean=0.0, std=std)
        return
    rows = old.data.float()
    mean = rows.mean(dim=0)
    centered = rows - mean
    covariance = _COVARIANCE_SCALE * (centered.T @ centered / rows.shape[0])
    if constraints.positive_definite.check(covariance).all():
        drawn = MultivariateNormal(mean, covariance_matrix=covariance).sample((added,))
    else:  # too few distinct rows for a distribution: the mean itself
        drawn = mean[None].expand(added, -1)
    fresh.data[-added:] = drawn.to(fresh.dtype)


def _initializer_range(raw_config: dict) -> float:
    """The std transformers' ``_init_weights`` uses: the top-level config's, else the text config's."""
    if "initializer_range" in raw_config:
        return raw_config["initializer_range"] or 0.02
    for key in ("init_std", "initializer_factor"):
        if raw_config.get(key) is not None:
            return raw_config[key]
    return (raw_config.get("text_config") or {}).get("initializer_range", 0.02)


def _set_vocab_size(model, size: int) -> None:
    """The new vocabulary size in the text config (which ``save_pretrained`` writes) and ``model.vocab_size``
    (as transformers sets it)."""
    model.config.get_text_config().vocab_size = size
    model.vocab_size = size
