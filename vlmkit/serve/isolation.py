"""How one request's failure stays its own (used by ``decoding``'s decoders on the worker thread).

A batched forward pass that raises is tried again on a copy of each request's rows to find the request
that fails by itself; that request is failed, its rows are dropped and the pass runs again for the
others. Sampling is per request already, so a request whose sampling raises is known at once; the
others draw again from where their generators were, so every other row gets the token it gets alone."""

import logging

import torch

from ..errors import VlmkitError
from .batching import copy_rows, sample_rows

log = logging.getLogger("vlmkit.serve")


def isolated_forward(part, run, drop, still_running):
    """``run(part.cache)``, a forward pass over every row of ``part`` (a decoder's part: ``cache``,
    ``jobs()``, ``rows_of(job)``, ``kind``). If it raises, each request's rows are tried alone with
    ``run(copy, rows)``; the requests that fail alone are failed, ``drop(culprits)`` removes their rows and
    the pass runs again for the rest. Returns its result, or None when ``still_running()`` says no row is
    left. When no request fails alone the fault is not one request's: the error goes up to the scheduler."""
    length = part.cache.length
    try:
        return run(part.cache)
    except Exception as err:
        part.cache.length = length  # a pass that failed half-way has advanced nothing that counts
        jobs = part.jobs()
        culprits = {jobs[0]: err} if len(jobs) == 1 else {}
        for job in jobs if len(jobs) > 1 else ():
            rows = part.rows_of(job)
            try:
                run(copy_rows(part.cache, rows), rows)
            except Exception as alone:
                culprits[job] = alone
        if not culprits:
            raise
    for job, err in culprits.items():
        fail_job(job, err, part.kind)
    drop(set(culprits))
    return run(part.cache) if still_running() else None


def sample_isolated(logits: torch.Tensor, requests: dict) -> tuple[torch.Tensor, dict]:
    """Each row's next token for ``requests`` ({job: RowSampling}), and {job: error} for those whose
    sampling failed (their rows' tokens are meaningless)."""
    rewind = {job: job.generator.get_state() for job in requests if job.generator is not None} \
        if len(requests) > 1 else {}
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    try:
        return sample_rows(logits, list(requests.values())), {}
    except Exception as err:
        if len(requests) == 1:
            return tokens, {job: err for job in requests}
    for job, state in rewind.items():  # each request draws again from where it was, alone
        job.generator.set_state(state)
    failed = {}
    for job, request in requests.items():
        try:
            tokens[request.rows] = sample_rows(logits, [request])[request.rows]
        except Exception as err:
            failed[job] = err
    return tokens, failed


def fail_job(job, err: BaseException, kind: str) -> None:
    """Fail one request whose share of a step raised; a fault that is not bad input is logged in full."""
    if isinstance(err, VlmkitError):
        log.info("a %s request failed: %s", kind, err)
    else:
        log.error("a %s request failed; the others in its step go on", kind, exc_info=err)
    job.fail(err)
