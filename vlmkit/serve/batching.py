"""The two tools that let requests share decode steps: joining KV caches of different lengths into one
batch, and drawing each row's next token with its own request's settings and random generator.

Every row of a ``KVCache`` writes its next key in the same column (one fill counter), so caches are
joined right-aligned: a shorter history gets masked padding on its left. Positions are per row, so
rotary angles are unaffected; the ``key_mask`` keeps the padding out of attention."""

import copy as copy_module
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..generation.config import GenerationConfig
from ..generation.logits import apply_processors
from ..generation.sampling import next_token
from ..nn.cpu_kernels import torch_ops_on_one_thread
from ..nn.kv_cache import KVCache


def can_merge(cache) -> bool:
    """Whether caches like this one can be joined. A ``KVCache`` subclass that carries more per-row
    state (IDEFICS keeps each request's image keys with its cache) can once it defines
    ``join_extra(self, parts)``: fill that state for the joined rows from ``parts``, in row order."""
    return type(cache) is KVCache or callable(getattr(type(cache), "join_extra", None))


def merge_caches(caches: list[KVCache], room: int) -> KVCache:
    """One cache holding every row of ``caches`` in order, right-aligned at the longest fill, with
    space for ``room`` more positions."""
    first = caches[0]
    length = max(cache.length for cache in caches)
    layers, _, heads, _, head_dim = first.keys.shape
    merged = type(first)(layers, sum(cache.batch_size for cache in caches), heads, head_dim, length + room,
                         first.keys.dtype, first.keys.device)
    row = 0
    for cache in caches:
        rows, start = slice(row, row + cache.batch_size), length - cache.length
        merged.keys[:, rows, :, :start] = 0  # the left gap is masked, but must hold numbers (see KVCache)
        merged.values[:, rows, :, :start] = 0
        merged.keys[:, rows, :, start:length] = cache.keys[:, :, :, :cache.length]
        merged.values[:, rows, :, start:length] = cache.values[:, :, :, :cache.length]
        merged.key_mask[rows, start:length] = cache.key_mask[:, :cache.length]
        row += cache.batch_size
    merged.length = length
    if type(merged) is not KVCache:
        merged.join_extra(caches)
    return merged


def copy_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A copy of ``rows`` of ``cache`` (to try a step on them alone): ``select_rows`` indexes new tensors,
    so only those rows are copied and ``cache`` is left as it was. A running cache always has room for
    the next position."""
    copy = copy_module.copy(cache)
    copy.layer_steps = {}
    copy.select_rows(rows)
    return copy


def keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` of ``cache``, then drop leading columns that are padding in every kept row
    (left behind by a long request that has finished), so attention stops paying for them."""
    cache.select_rows(rows)
    used = cache.key_mask[:, :cache.length].any(dim=0)
    if not bool(used.any()):
        return
    first = int(used.int().argmax())
    if first:
        cache.keys, cache.values = cache.keys[:, :, :, first:], cache.values[:, :, :, first:]
        cache.key_mask = cache.key_mask[:, first:]
        cache.length -= first
        cache.max_len -= first


@dataclass
class RowSampling:
    """The rows of one request in a step's logits, with how that request samples: its logits pipeline
    (``generation.logits``: the checkpoint's and the request's processors, then the sampling warpers
    ``generate`` builds from ``config``) over ``seen_ids``, each row's prompt + answer so far."""

    rows: list[int]
    config: GenerationConfig
    generator: torch.Generator | None
    seen_ids: torch.Tensor | None = None
    processors: list = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs
    # filled by sample_rows when top_logprobs is set: (sampled tokens, their logprobs, top values, top ids)
    logprobs: tuple | None = None


def sample_rows(logits: torch.Tensor, requests: list[RowSampling]) -> torch.Tensor:
    """Next token of every row of ``logits`` [rows, vocab]. Greedy rows with nothing to process take one
    argmax together; each other request runs its own pipeline and draws from its own generator, so a
    seeded request's tokens do not depend on what else shares the batch (and equal ``generate`` with
    that seed). Logprobs are the log-softmax of the processed scores, before the warpers."""
    with torch_ops_on_one_thread(logits):  # torch's threads idle, not spinning, when the kernels resume
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        plain = [r for s in requests if _plain_greedy(s) for r in s.rows]
        if plain:
            index = torch.tensor(plain, device=logits.device)
            tokens[index] = logits[index].float().argmax(dim=-1)
        for request in requests:
            if _plain_greedy(request):
                continue
            index = torch.tensor(request.rows, device=logits.device)
            seen = request.seen_ids.to(logits.device) if request.seen_ids is not None else None
            scores = apply_processors(request.processors, seen, logits[index].float())
            if bool(scores.isneginf().all(dim=-1).any()):
                raise InputError(NOTHING_ALLOWED)
            drawn = next_token(scores, request.config, request.generator)  # the warpers, then a draw or argmax
            tokens[index] = drawn
            if request.top_logprobs is not None:
                logprobs = scores.log_softmax(dim=-1)
                top = logprobs.topk(request.top_logprobs, dim=-1) if request.top_logprobs else None
                request.logprobs = (drawn.tolist(), logprobs.gather(1, drawn[:, None])[:, 0].tolist(),
                                    top.values.tolist() if top is not None else [[]] * len(request.rows),
                                    top.indices.tolist() if top is not None else [[]] * len(request.rows))
        return tokens


# what a request hears when its options together leave no token to draw (a grammar that must end while
# min_tokens bans the end, allowed_token_ids outside the grammar...): greedy would take token 0, sampling fail
NOTHING_ALLOWED = ("the request's options together leave no token that may come next (min_tokens, stop_token_ids, "
                   "allowed_token_ids, bad_words, logit_bias and the grammar of structured_outputs, response_format or "
                   "tools all narrow it): loosen one of them")


def _plain_greedy(request: RowSampling) -> bool:
    return not request.config.do_sample and not request.processors and request.top_logprobs is None
