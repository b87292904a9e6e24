"""The batching scheduler: one worker thread owns the model; requests queue for it and share its steps.

Callers (the HTTP app, batch jobs) ``submit`` a prepared task and get a ``Job`` back. The worker loops:
admit queued jobs while the batch has room (each is prefilled alone), then run one decode step for
every running answer together and one for every running image together. A job admitted while others
decode joins them at the next step. Between steps the worker drops the rows of cancelled jobs, so a
client that goes away frees its slot at once. The queue is bounded: past ``max_waiting`` queued jobs,
``submit`` raises ``ServerBusy``.

A job reports through ``listener(event)`` (called on the worker thread; it must not block) and, for
callers that simply wait, through ``Job.wait()``."""

import logging
import threading
import time
import uuid
from collections import deque
from functools import partial
from dataclasses import dataclass, field

import torch

from ..errors import InputError, VlmkitError
from ..generation.config import GenerationConfig
from .decoding import ImageDecoder, TextDecoder
from .options import ChatOptions
from .events import ChatOutcome, ChoiceEnd, ImageOutcome, JobEnd, JobFailed, TextDelta

log = logging.getLogger("vlmkit.serve")


class ServerBusy(VlmkitError):
    """The queue is full or the server is shutting down; the request may be retried later."""


class JobCancelled(VlmkitError):
    """The job was cancelled (its client went away) before it finished."""


# --- what callers submit -------------------------------------------------------------------------
@dataclass
class ChatTask:
    """A chat request ready for the model: the processor's inputs for one conversation (batch of 1)."""

    inputs: dict
    config: GenerationConfig  # how to sample (do_sample, temperature, top_p, top_k, seed, penalty, eos)
    max_tokens: int
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens whatever the model says
    include_stop: bool = False  # the stop string that ends an answer stays in it
    skip_special_tokens: bool = True  # special tokens are left out of the text
    answer_prefix: str = ""  # what the template leaves the model to write before its answer (Janus: " ")
    options: ChatOptions = field(default_factory=ChatOptions)  # logprobs, penalties, logit_bias, grammar, tools

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass
class ImageTask:
    """An image-generation request: the prompt's token ids [1, T] ending in <begin_of_image>."""

    input_ids: torch.Tensor
    config: GenerationConfig  # do_sample, temperature, top_k, top_p, guidance_scale, seed
    n: int = 1
    partial_images: int = 0  # pictures so far to report while drawing (streamed requests, 0-3)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class Job:
    """A submitted task: cancel it, wait for it, or follow its events through ``listener``."""

    def __init__(self, task, listener=None):
        self.id = uuid.uuid4().hex
        self.task = task
        self.listener = listener
        self.outcome = None
        self.error: BaseException | None = None
        self.generator = None  # the request's own torch.Generator (set when it is admitted)
        self.prompt_ids = None
        self._choices: dict[int, ChoiceEnd] = {}
        self._cancelled = False
        self._done = threading.Event()
        self._on_change = None  # the scheduler's wake-up, set by submit
        self._on_done = None  # the scheduler's counters, set by submit
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None  # set by the text decoder (time to first token)

    @property
    def kind(self) -> str:
        return "images" if isinstance(self.task, ImageTask) else "text"

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop working on this job (its rows leave the batch before the next step); no-op once done."""
        if not self._done.is_set():
            self._cancelled = True
            if self._on_change is not None:
                self._on_change()

    def wait(self, timeout: float | None = None):
        """Block until the job ends; return its outcome or raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.outcome

    # called on the worker thread by the decoders ------------------------------------------------
    def text(self, index: int, text: str, logprobs: list[dict] | None = None) -> None:
        self._emit(TextDelta(index, text, logprobs))

    def end_choice(self, index: int, text: str, finish_reason: str, completion_tokens: int,
                   logprobs: list[dict] | None = None, last_logprobs: list[dict] | None = None,
                   tool_calls: list[dict] | None = None) -> None:
        end = ChoiceEnd(index, text, finish_reason, completion_tokens, logprobs, last_logprobs, tool_calls)
        self._choices[index] = end
        self._emit(end)
        if len(self._choices) == self.task.n:
            self._finish(ChatOutcome(self.task.prompt_tokens, [self._choices[i] for i in range(self.task.n)]))

    def partial_image(self, event) -> None:
        self._emit(event)  # an image_stream.PartialImage

    def end_images(self, images: list) -> None:
        self._finish(ImageOutcome(images))

    def fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._end(JobFailed(error))

    def _finish(self, outcome) -> None:
        self.outcome = outcome
        self._end(JobEnd(outcome))

    def _end(self, event) -> None:
        if self._on_done is not None:
            self._on_done(self)
        self._emit(event)
        self._done.set()

    def _emit(self, event) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event)
        except Exception:  # a listener whose client is gone must not stop the worker
            log.debug("listener of job %s failed", self.id, exc_info=True)


class Scheduler:
    """Owns the model on one worker thread; see the module docstring."""

    def __init__(self, engine, *, max_batch_rows: int = 32, max_batch_images: int = 8, max_waiting: int = 256,
                 max_prefill_tokens: int = 8192):
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_batch_images = max_batch_images
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled between two decode steps
        self._text = TextDecoder(engine.model, engine.tokenizer)
        self._images = ImageDecoder(engine) if engine.can_generate_images else None
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.on_job_done = None  # called with each job that ends, on the thread that ends it (metrics)
        self._stats = dict(submitted=0, completed=0, failed=0, cancelled=0, rejected=0, steps=0, image_steps=0,
                           batched_steps=0, max_requests_in_step=0, joined_running=0, prefill_s=0.0, decode_s=0.0,
                           image_decode_s=0.0)

    # --- the callers' side --------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="vlmkit-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, task, listener=None) -> Job:
        """Queue ``task`` (a ``ChatTask`` or ``ImageTask``); raises ``ServerBusy`` when the queue is full."""
        if isinstance(task, ImageTask):
            if self._images is None:
                raise InputError("this model cannot generate images (only Janus checkpoints with generation weights "
                                 "can)")
            if task.n > self.max_batch_images:
                raise InputError(f"n={task.n} images is more than this server draws at once "
                                 f"({self.max_batch_images}); ask for fewer")
        elif task.n > self.max_batch_rows:
            raise InputError(f"n={task.n} choices is more than this server decodes at once ({self.max_batch_rows})")
        job = Job(task, listener)
        job._on_change, job._on_done = self._notify, self._count_done
        with self._wake:
            self.check_capacity()
            self._waiting.append(job)
            self._stats["submitted"] += 1
            self._wake.notify()
        return job

    def check_capacity(self) -> None:
        """Raise ``ServerBusy`` if a new job would be refused now (lets callers refuse before costly work)."""
        with self._wake:
            if self._stopping:
                raise ServerBusy("the server is shutting down; retry on another replica or later")
            if len(self._waiting) < self.max_waiting:
                return
            self._stats["rejected"] += 1
            raise ServerBusy(f"the server is busy: {len(self._waiting)} requests are already waiting for the "
                             f"model (--max-waiting {self.max_waiting}); retry later")

    def stats(self) -> dict:
        """Counters for monitoring and tests: how many steps were shared by several requests, etc."""
        with self._wake:
            return dict(self._stats, waiting=len(self._waiting), running_rows=len(self._text.rows),
                        running_images=len(self._images.images) if self._images else 0)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, cancel queued and running ones, and stop the worker."""
        with self._wake:
            self._stopping = True
            for job in self._waiting:
                job.fail(ServerBusy("the server shut down before this request started"))
            self._waiting.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _count_done(self, job: Job) -> None:
        outcome = "completed" if job.error is None else \
            "cancelled" if isinstance(job.error, JobCancelled) else "failed"
        with self._wake:
            self._stats[outcome] += 1
        if self.on_job_done is not None:
            try:
                self.on_job_done(job)
            except Exception:  # monitoring must never fail a request
                log.exception("counting a finished job failed")

    # --- the worker -------------------------------------------------------------------------------
    def _running(self) -> int:
        return len(self._text.parts) + (len(self._images.parts) if self._images else 0)

    def _run(self) -> None:
        with torch.no_grad():  # as generate(); inference-mode tensors would leak into the vision feature cache
            while True:
                with self._wake:
                    while not self._waiting and not self._running() and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        self._cancel_running()
                        return
                    admitted = self._admit()
                started = time.perf_counter()
                for job in admitted:
                    self._guarded(job.kind, partial(self._decoder(job.kind).add, job), [job])
                self._drop_cancelled()
                decoding = time.perf_counter()
                if self._text.parts:
                    self._guarded("text", self._text_step, [row.job for row in self._text.rows])
                drawing = time.perf_counter()
                if self._images is not None and self._images.parts:
                    self._guarded("images", self._image_step, [image.job for image in self._images.images])
                self._stats["prefill_s"] += decoding - started  # seconds the worker spent on each kind of work
                self._stats["decode_s"] += drawing - decoding
                self._stats["image_decode_s"] += time.perf_counter() - drawing

    def _decoder(self, kind: str):
        return self._images if kind == "images" else self._text

    def _admit(self) -> list[Job]:
        """Take queued jobs, in order, while the batch has room (called holding the lock)."""
        rows, images, prefill = len(self._text.rows), len(self._images.images) if self._images else 0, 0
        running_text = rows > 0
        admitted, waiting, blocked = [], deque(), set()
        for job in self._waiting:
            if job.cancelled:
                job.fail(JobCancelled("cancelled while queued"))
                continue
            room = rows + job.task.n <= self.max_batch_rows if job.kind == "text" else \
                images + job.task.n <= self.max_batch_images
            budget = not admitted or prefill + job.task.prompt_tokens <= self.max_prefill_tokens
            if job.kind in blocked or not room or not budget:
                blocked.add(job.kind)  # first come, first served within a kind
                waiting.append(job)
                continue
            admitted.append(job)
            prefill += job.task.prompt_tokens
            if job.kind == "text":
                rows += job.task.n
                self._stats["joined_running"] += running_text
            else:
                images += job.task.n
        self._waiting = waiting
        return admitted

    def _text_step(self) -> None:
        requests = self._text.step()
        self._count(requests)
        self._stats["steps"] += 1

    def _image_step(self) -> None:
        self._images.step()
        self._stats["image_steps"] += 1

    def _count(self, requests: int) -> None:
        self._stats["max_requests_in_step"] = max(self._stats["max_requests_in_step"], requests)
        self._stats["batched_steps"] += requests > 1

    def _drop_cancelled(self) -> None:
        cancelled = set()

        def should_drop(job):
            if job.cancelled:
                cancelled.add(job)
            return job.cancelled

        self._text.drop(should_drop)
        if self._images is not None:
            self._images.drop(should_drop)
        for job in cancelled:
            job.fail(JobCancelled("the client went away"))

    def _guarded(self, kind: str, work, jobs: list[Job]) -> None:
        """Run ``work``; if it raises, fail the jobs it touched and clear that decoder so the rest goes on.
        A decode step fails a request whose own share fails by itself (``decoding``), so what reaches
        here is a prefill (one job) or a fault no single request explains."""
        before = {job for job in jobs if not job.done}
        try:
            work()
        except Exception as err:  # bad input the model caught (InputError), or a fault such as out-of-memory
            if not isinstance(err, VlmkitError):
                log.exception("the %s worker step failed; failing %d request(s)", kind, len(before))
            decoder = self._decoder(kind)
            decoder.drop(lambda job: job in before)
            for job in before:
                job.fail(err)

    def _cancel_running(self) -> None:
        def drop_all(job):
            job.fail(ServerBusy("the server shut down before this request finished"))
            return True

        self._text.drop(drop_all)
        if self._images is not None:
            self._images.drop(drop_all)
