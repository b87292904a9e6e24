"""Beam search, step for step as transformers' ``GenerationMixin._beam_search`` (vectorised over the
batch, ``length_penalty``, ``early_stopping`` True/False/"never", beam sampling with ``do_sample``), so
its beams are token-identical.

Every step keeps the best ``beams_to_keep`` continuations over all beams of a prompt (more than
``num_beams``, so enough survive when some end), moves those that just ended into the finished set
when they beat its worst, and carries the best ``num_beams`` unfinished ones on; the KV cache rows
follow the surviving beams (``select_rows``). tests/test_generate_options.py compares it with the
reference on every family."""

import torch

from ..nn.cpu_kernels import torch_ops_on_one_thread
from .decode import decode_one_token
from .logits import apply_processors
from .outputs import GenerateBeamDecoderOnlyOutput
from .sampling import make_generator
from .stopping import Stopping

# the reference's stand-in for "impossible" in score arithmetic (not -inf, which would make NaNs)
_NEVER = -1.0e9


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The beams ``indices`` [batch, k] of ``tensor`` [batch, beams, ...]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _fill_value(config) -> int:
    """What the reference leaves past a beam's end: the pad token (if not 0), else the first
    end-of-sequence token; -1 without one."""
    eos = config.eos_token_ids
    if not eos:
        return -1
    return config.pad_token_id if config.pad_token_id else eos[0]


@torch.no_grad()
def beam_search(step, logits: torch.Tensor, input_ids: torch.Tensor, config, budget: int, processors,
                stops: Stopping):
    """Beam search after a prefill whose ``logits`` [batch * num_beams, V] and KV cache rows are already
    repeated per beam; ``step`` = (model, next positions [rows, 1], cache)."""
    model, next_position, cache = step
    num_beams, device = config.num_beams, input_ids.device
    rows, prompt_length = input_ids.shape
    batch = rows // num_beams
    max_length = prompt_length + budget
    beams_to_keep = max(2, 1 + len(config.eos_token_ids)) * num_beams
    top_beams = torch.arange(beams_to_keep, device=device) < num_beams
    keep_scores = config.return_dict_in_generate and config.output_scores
    keep_logits = config.return_dict_in_generate and config.output_logits
    all_scores = () if keep_scores else None
    all_logits = ()

    running = torch.full((batch, num_beams, max_length), _fill_value(config), dtype=torch.long, device=device)
    running[:, :, :prompt_length] = input_ids.view(batch, num_beams, prompt_length)
    finished = running.clone()
    # only the first beam starts alive, so the first step does not pick the same token num_beams times
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEVER
    finished_scores = torch.full((batch, num_beams), _NEVER, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_origins = torch.full((batch, num_beams, budget), -1, dtype=torch.int32, device=device)
    finished_origins = running_origins.clone()
    identity = torch.arange(rows, device=device)
    generator = make_generator(config.seed, device)
    flat = input_ids
    cur_len = prompt_length
    while True:
        with torch_ops_on_one_thread(logits):
            logits = logits.float()
            log_probs = apply_processors(processors, flat, logits.log_softmax(dim=-1))
            if keep_logits:
                all_logits += (logits.clone(),)
            if keep_scores:
                all_scores += (log_probs.clone(),)
            vocab = log_probs.shape[-1]
            totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)

            # the best beams_to_keep continuations over all beams of each prompt (drawn without replacement
            # when sampling)
            if config.do_sample:
                top_indices = torch.multinomial(totals.softmax(dim=-1), beams_to_keep, generator=generator)
                top_scores = totals.gather(1, top_indices)
            else:
                top_scores, top_indices = torch.topk(totals, k=beams_to_keep)
        from_beam = top_indices // vocab
        top_origins = _gather_beams(running_origins, from_beam)
        top_sequences = _gather_beams(running, from_beam)
        top_sequences[:, :, cur_len] = top_indices % vocab
        top_origins[:, :, cur_len - prompt_length] = from_beam + torch.arange(batch, device=device)[:, None] * num_beams

        candidates = top_sequences[:, :, :cur_len + 1].reshape(batch * beams_to_keep, cur_len + 1)
        ended = stops(candidates, all_scores, candidates[:, -1])
        at_limit = cur_len + 1 >= max_length
        if ended is None:
            ended = torch.full((candidates.shape[0],), at_limit, dtype=torch.bool, device=device)
        elif at_limit:
            ended = torch.ones_like(ended)
        ended = ended.view(batch, beams_to_keep)

        # the best num_beams continuations that did not end carry on
        alive_scores = top_scores + ended.float() * _NEVER
        keep = torch.topk(alive_scores, k=num_beams)[1]
        running = _gather_beams(top_sequences, keep)
        running_scores = _gather_beams(alive_scores, keep)
        running_origins = _gather_beams(top_origins, keep)

        finished, finished_scores, finished_origins, is_finished = _update_finished(
            config, finished, top_sequences, finished_scores, top_scores, finished_origins, top_origins,
            can_improve, is_finished, ended & top_beams[None, :], cur_len + 1 - prompt_length)

        beam_rows = running_origins[..., cur_len - prompt_length].reshape(-1).long()
        cur_len += 1
        can_improve = _can_improve(config, can_improve, running_scores, finished_scores, is_finished,
                                   cur_len - prompt_length, max_length - prompt_length)
        open_beam = not (bool(is_finished.all()) and config.early_stopping is True)
        if not (bool(can_improve.any()) and open_beam and not bool(ended.all())):
            break
        if not torch.equal(beam_rows, identity):  # the cache follows the beams (a copy: skipped when none moved)
            cache.select_rows(beam_rows)
        flat = running[:, :, :cur_len].reshape(rows, cur_len)
        logits = decode_one_token(model, flat[:, -1:], next_position, cache)
        next_position = next_position + 1

    returned = config.num_return_sequences
    sequences = finished[:, :returned].reshape(batch * returned, max_length)
    sequence_scores = finished_scores[:, :returned].reshape(-1)
    origins = finished_origins[:, :returned].reshape(batch * returned, budget)
    generated = int((origins + 1).bool().sum(dim=1).max())
    sequences, origins = sequences[:, :prompt_length + generated], origins[:, :generated]
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=sequence_scores if keep_scores else None,
                                         scores=all_scores, logits=all_logits if keep_logits else None,
                                         beam_indices=origins)


def _update_finished(config, finished, top_sequences, finished_scores, top_scores, finished_origins, top_origins,
                     can_improve, is_finished, just_ended, generated_length: int):
    """The best num_beams of the finished beams so far and the top beams that just ended, their scores
    length-penalised; none is added once a prompt's set is full (early_stopping=True) or cannot improve."""
    num_beams = finished.shape[1]
    scores = top_scores / (generated_length ** config.length_penalty)
    full = torch.all(is_finished, dim=-1, keepdim=True) & (config.early_stopping is True)
    scores += full.float() * _NEVER
    scores += (~can_improve).float() * _NEVER
    scores += (~just_ended) * _NEVER
    merged_scores = torch.cat((finished_scores, scores), dim=1)
    best = torch.topk(merged_scores, k=num_beams)[1]
    return (_gather_beams(torch.cat((finished, top_sequences), dim=1), best),
            _gather_beams(merged_scores, best),
            _gather_beams(torch.cat((finished_origins, top_origins), dim=1), best),
            _gather_beams(torch.cat((is_finished, just_ended), dim=1), best))


def _can_improve(config, can_improve, running_scores, finished_scores, is_finished, generated_length: int,
                 longest: int) -> torch.Tensor:
    """Whether each prompt's best running beam could still beat its worst finished one (the reference's
    heuristic: at the current length, or at the longest allowed for early_stopping="never" with a
    positive length penalty)."""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        generated_length = longest
    best_possible = running_scores[:, :1] / (generated_length ** config.length_penalty)
    worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEVER)
    return can_improve & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)
