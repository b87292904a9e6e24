"""The rows the scheduler's worker decodes: answers (text) and, for Janus, images.

A request is prefilled alone, exactly as ``Engine.chat`` / ``Engine.imagine`` would run it, into a cache
of its own; from then on its rows share every decode step with whatever else is running, its cache
joined to theirs (``batching.merge_caches``). Rows leave the batch the step they finish or their
request is cancelled. Everything here runs on the worker thread only. A failure while computing one
request's share of a step fails that request alone (``isolation``)."""

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..generation import image_step
from ..generation.logits import logits_processors
from ..generation.loop import prompt_positions
from ..generation.sampling import make_generator
from .batching import RowSampling, can_merge, keep_rows, merge_caches, sample_rows
from .image_stream import PartialImages
from .isolation import fail_job, isolated_forward, sample_isolated
from .answers import AnswerText, TextRow
from .options import logprob_entries

log = logging.getLogger("vlmkit.serve")


@dataclass
class _Part:
    """Rows that share one KV cache; ``last`` holds each row's newest token, not yet fed to the model."""

    cache: object
    rows: list
    last: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows, 1], each row's next position id
    kind: ClassVar[str] = "text"

    def jobs(self) -> list:
        return list(dict.fromkeys(row.job for row in self.rows))

    def rows_of(self, job) -> torch.Tensor:
        return torch.tensor([i for i, row in enumerate(self.rows) if row.job is job], device=self.last.device)

    def keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.last.device)
        keep_rows(self.cache, index)
        self.rows = [self.rows[i] for i in keep]
        self.last, self.positions = self.last[index], self.positions[index]


class TextDecoder:
    """The running answers: one part (one KV cache) when the model's caches can be joined, else one per request."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(model.generation_config.eos_token_ids)
        self.parts: list[_Part] = []

    @property
    def rows(self) -> list[TextRow]:
        return [row for part in self.parts for row in part.rows]

    def add(self, job) -> None:
        """Prefill a request alone and draw its first token(s); its rows join the batch at the next step."""
        task, model = job.task, self.model
        inputs = dict(task.inputs)
        input_ids = inputs.pop("input_ids").to(model.device)
        mask = inputs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask.to(model.device)
        positions = prompt_positions(mask)
        cache = model.new_cache(1, input_ids.shape[1] + task.max_tokens)
        logits = model.prefill(input_ids, mask, positions, cache, **model.model_inputs(**inputs))
        copies = torch.zeros(task.n, dtype=torch.long, device=model.device)
        if task.n > 1:
            cache.select_rows(copies)
            logits = logits[copies]
        job.generator = make_generator(task.config.seed, model.device)
        prompt_length = input_ids.shape[1]
        # the request's logits pipeline: the checkpoint's processors (as generate builds them), then the
        # OpenAI options'; the sampling warpers are added when sampling (see batching.sample_rows)
        job.processors = logits_processors(task.config.updated(do_sample=False), prompt_length,
                                           max_length=prompt_length + task.max_tokens) + \
            task.options.processors(prompt_length)
        job.grammar = task.options.grammar(task.n, prompt_length)
        job.prompt_ids = input_ids[0].tolist() if job.processors or job.grammar else None
        rows = [TextRow(job, i, AnswerText(self.tokenizer, task.stop, task.answer_prefix, task.include_stop,
                                                task.skip_special_tokens, task.config.min_new_tokens or 0),
                        logprobs=[] if task.options.top_logprobs is not None else None) for i in range(task.n)]
        requests = {job: _sampling(job, rows, list(range(task.n)))}
        tokens = sample_rows(logits, list(requests.values()))
        job.first_token_at = time.perf_counter()
        part = _Part(cache, rows, tokens, positions[:, -1:][copies] + 1)
        self._after_sampling(part, tokens, logprobs=self._logprobs(requests, rows))

    def step(self) -> int:
        """Feed every row its newest token and draw the next; returns how many requests shared the step.
        A request whose share of the step fails is failed alone (see the module docstring)."""
        if len(self.parts) > 1 and all(can_merge(part.cache) for part in self.parts):
            self.parts = [self._merged(self.parts)]
        jobs = 0
        for part in list(self.parts):
            logits = self._forward(part)
            if logits is None:
                continue
            part.positions = part.positions + 1
            by_job: dict = {}
            for i, row in enumerate(part.rows):
                by_job.setdefault(row.job, []).append(i)
            jobs = max(jobs, len(by_job))
            requests = {job: _sampling(job, part.rows, indices) for job, indices in by_job.items()}
            tokens, failed = sample_isolated(logits, requests)
            self._after_sampling(part, tokens, added=False, failed=failed,
                                 logprobs=self._logprobs(requests, part.rows, failed))
        return jobs

    def _forward(self, part: _Part) -> torch.Tensor | None:
        """The part's next-token logits, without the rows of any request that makes the forward pass fail
        (None when no row is left)."""
        def run(cache, rows=None):
            if rows is None:
                return self.model.decode(part.last[:, None], part.positions, cache)
            return self.model.decode(part.last[rows][:, None], part.positions[rows], cache)

        return isolated_forward(part, run, lambda culprits: self._keep(
            part, [i for i, row in enumerate(part.rows) if row.job not in culprits]), lambda: part in self.parts)

    def drop(self, should_drop) -> None:
        """Remove the rows whose job ``should_drop(job)`` (cancelled ones), at once."""
        for part in list(self.parts):
            keep = [i for i, row in enumerate(part.rows) if not should_drop(row.job)]
            self._keep(part, keep)

    def _logprobs(self, requests: dict, rows: list[TextRow], failed: dict | None = None) -> dict[int, dict]:
        """{row index: its token's logprobs entry} for the requests that asked for logprobs."""
        entries = {}
        for job, request in requests.items():
            if request.logprobs is None or job in (failed or {}):
                continue
            for i, entry in zip(request.rows, logprob_entries(job.task.options.tokens, *request.logprobs)):
                entries[i] = entry
        return entries

    def _after_sampling(self, part: _Part, tokens: torch.Tensor, added: bool = True,
                        failed: dict | None = None, logprobs: dict | None = None) -> None:
        part.last = tokens
        failed = dict(failed or {})
        logprobs = logprobs or {}
        keep = []
        for i, (row, token) in enumerate(zip(part.rows, tokens.tolist())):
            if row.job in failed:
                continue
            try:
                if row.take(token, self.eos, logprobs.get(i)):
                    keep.append(i)
            except Exception as err:  # the text of this answer (a stop string, the tokenizer) failed
                failed[row.job] = err
        keep = [i for i in keep if part.rows[i].job not in failed]
        for job, err in failed.items():
            fail_job(job, err, "text")
        if added:
            self.parts.append(part)
        self._keep(part, keep)

    def _keep(self, part: _Part, keep: list[int]) -> None:
        if not keep:
            self.parts.remove(part)
        elif len(keep) < len(part.rows):
            part.keep(keep)

    def _merged(self, parts: list[_Part]) -> _Part:
        rows = [row for part in parts for row in part.rows]
        room = max(row.job.task.max_tokens - len(row.tokens) for row in rows)
        cache = merge_caches([part.cache for part in parts], room)
        return _Part(cache, rows, torch.cat([p.last for p in parts]), torch.cat([p.positions for p in parts]))


def _sampling(job, rows: list[TextRow], indices: list[int]) -> RowSampling:
    seen = None
    if job.prompt_ids is not None:  # prompt + answer so far; a request's rows are always the same length
        seen = torch.tensor([job.prompt_ids + rows[i].tokens for i in indices])
    processors = job.processors
    if job.grammar is not None:  # each choice's own matcher, for the rows still running
        processors = processors + [job.grammar.select([rows[i].index for i in indices])]
    return RowSampling(indices, job.task.config, job.generator, seen, processors, job.task.options.top_logprobs)


@dataclass
class ImageRow:
    """One image being drawn: its tokens so far."""

    job: object
    index: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class _ImagePart:
    """Images sharing one KV cache: image i conditions on row ``cond[i]`` and guides against ``uncond[i]``."""

    cache: object
    images: list[ImageRow]
    hidden: torch.Tensor  # [rows, hidden]: each row's last hidden state, not yet turned into a token
    positions: torch.Tensor  # [rows, 1]
    cond: torch.Tensor
    uncond: torch.Tensor
    kind: ClassVar[str] = "image"

    def jobs(self) -> list:
        return list(dict.fromkeys(image.job for image in self.images))

    def rows_of(self, job) -> torch.Tensor:
        """The job's conditional rows, then its unconditional ones."""
        indices = [i for i, image in enumerate(self.images) if image.job is job]
        return torch.cat([self.cond[indices], self.uncond[indices]])


class ImageDecoder:
    """The running Janus image generations, with classifier-free guidance, as ``generate_image_tokens``."""

    def __init__(self, engine):
        self.model = engine.model
        self.processor = engine.processor
        self.parts: list[_ImagePart] = []
        self.partials = PartialImages(self.model, self.processor)

    @property
    def images(self) -> list[ImageRow]:
        return [image for part in self.parts for image in part.images]

    def add(self, job) -> None:
        """Prefill the conditional and unconditional prompts of a request's ``n`` images."""
        from ..models.janus.image_generation import prefill_guided_rows

        task, model = job.task, self.model
        ids = task.input_ids.to(model.device).repeat_interleave(task.n, dim=0)
        hidden, next_position, cache = prefill_guided_rows(model, ids, torch.ones_like(ids), task.config)
        job.generator = make_generator(task.config.seed, model.device)
        index = torch.arange(task.n, device=model.device)
        self.parts.append(_ImagePart(cache, [ImageRow(job, i) for i in range(task.n)], hidden, next_position,
                                     index, index + task.n))

    def step(self) -> None:
        """Draw one token of every running image; finished requests get their pictures decoded. A request
        whose share of the step fails is failed alone (see the module docstring)."""
        if len(self.parts) > 1 and all(can_merge(part.cache) for part in self.parts):
            self.parts = [self._merged(self.parts)]
        for part in list(self.parts):
            tokens = self._draw(part)
            if tokens is None:
                continue
            for image, token in zip(part.images, tokens.tolist()):
                image.tokens.append(token)
            self._report_partials(part.images)
            done = [i for i, image in enumerate(part.images) if len(image.tokens) >= self.model.num_image_tokens]
            if done:
                self._finish([part.images[i] for i in done])
                self._keep(part, [i for i in range(len(part.images)) if i not in set(done)])
                if part not in self.parts:
                    continue
                tokens = tokens[[i for i in range(len(tokens)) if i not in set(done)]]
            self._feed(part, tokens)

    def _draw(self, part: _ImagePart) -> torch.Tensor | None:
        """The next token of each image of ``part``; requests whose logits or sampling fail leave the part
        (None when none is left)."""
        head, groups = self.model.model.generation_head, _group_by_job(part.images)
        failed, logits = {}, {}
        try:
            everything = head(part.hidden).float()
            logits = {job: everything[part.rows_of(job)] for job in groups}
        except Exception as err:  # find the requests whose rows fail alone
            if len(groups) == 1:
                failed = {job: err for job in groups}
            for job in groups if len(groups) > 1 else ():
                try:
                    logits[job] = head(part.hidden[part.rows_of(job)]).float()
                except Exception as alone:
                    failed[job] = alone
            if not failed:
                raise
        tokens = torch.zeros(len(part.images), dtype=torch.long, device=part.hidden.device)
        for job, indices in groups.items():
            if job in failed:
                continue
            try:  # the job's rows: its conditional ones, then its unconditional ones
                tokens[indices] = image_step.guided_image_token(logits[job], job.task.config, job.generator)
            except Exception as err:
                failed[job] = err
        if not failed:
            return tokens
        keep = [i for i, image in enumerate(part.images) if image.job not in failed]
        for job, err in failed.items():
            fail_job(job, err, "image")
        self._keep(part, keep)
        return tokens[keep] if part in self.parts else None

    def _feed(self, part: _ImagePart, tokens: torch.Tensor) -> None:
        """Run the drawn tokens through the language model: each row's next hidden state."""
        def run(cache, rows=None):
            row_tokens = torch.empty(part.hidden.shape[0], dtype=torch.long, device=tokens.device)
            row_tokens[part.cond], row_tokens[part.uncond] = tokens, tokens
            positions = part.positions
            if rows is not None:
                row_tokens, positions = row_tokens[rows], positions[rows]
            return image_step.decode_image_token(self.model, row_tokens, positions, cache)

        def drop(culprits):
            nonlocal tokens
            keep = [i for i, image in enumerate(part.images) if image.job not in culprits]
            self._keep(part, keep)
            tokens = tokens[keep]

        hidden = isolated_forward(part, run, drop, lambda: part in self.parts)
        if hidden is not None:
            part.hidden = hidden
            part.positions = part.positions + 1

    def _report_partials(self, images: list[ImageRow]) -> None:
        """Streamed requests' pictures so far. A preview is only a preview: one that fails to draw is
        logged and skipped, and the request goes on to its final picture."""
        try:
            self.partials.after_token(images)
        except Exception:
            log.warning("could not draw a partial picture; the request goes on", exc_info=True)

    def drop(self, should_drop) -> None:
        for part in list(self.parts):
            self._keep(part, [i for i, image in enumerate(part.images) if not should_drop(image.job)])

    def _finish(self, images: list[ImageRow]) -> None:
        for job, rows in _group_by_job(images).items():
            try:
                tokens = torch.tensor([images[i].tokens for i in rows], device=self.model.device)
                pixels = self.model.decode_image_tokens(tokens)
                pictures = self.processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")
            except Exception as err:
                fail_job(job, err, "image")
                continue
            job.end_images(pictures["pixel_values"])

    def _keep(self, part: _ImagePart, keep: list[int]) -> None:
        if not keep:
            self.parts.remove(part)
            return
        if len(keep) == len(part.images):
            return
        index = torch.tensor(keep, device=part.hidden.device)
        rows = torch.cat([part.cond[index], part.uncond[index]])
        keep_rows(part.cache, rows)
        part.images = [part.images[i] for i in keep]
        part.hidden, part.positions = part.hidden[rows], part.positions[rows]
        part.cond = torch.arange(len(keep), device=rows.device)
        part.uncond = part.cond + len(keep)

    def _merged(self, parts: list[_ImagePart]) -> _ImagePart:
        images = [image for part in parts for image in part.images]
        room = max(self.model.num_image_tokens - len(image.tokens) for image in images)
        cache = merge_caches([part.cache for part in parts], room)
        offsets = [0]
        for part in parts[:-1]:
            offsets.append(offsets[-1] + part.hidden.shape[0])
        cond = torch.cat([part.cond + offset for part, offset in zip(parts, offsets)])
        uncond = torch.cat([part.uncond + offset for part, offset in zip(parts, offsets)])
        return _ImagePart(cache, images, torch.cat([p.hidden for p in parts]),
                          torch.cat([p.positions for p in parts]), cond, uncond)


def _group_by_job(images: list[ImageRow]) -> dict:
    groups: dict = {}
    for i, image in enumerate(images):
        groups.setdefault(image.job, []).append(i)
    return groups
