"""Rows of a batch file on the server's request path: ``BatchRequest`` (one input line, with the seed
a sampling row gets when it names none) and ``BatchWorker`` (one loaded model with the server's
``RequestHandler`` and ``Scheduler``, running many rows at once so they share the model's steps).

The local job, each Ray replica and the ``LLM`` API all run rows through ``BatchWorker``; there is no
other way from a request body to the model."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import InputError
from ..serve.config import ServeConfig
from .files import parse_line, row_custom_id

_GIVE = {"url": '"/v1/chat/completions", "/v1/completions" or "/v1/images/generations"',
         "method": '"POST" (or leave the field out)'}
_SEED_BITS = 63  # torch.Generator.manual_seed takes any int64


def derived_seed(custom_id: str) -> int:
    """The seed of a row that gives none: a hash of its custom_id, so a rerun, a resumed job, another
    --concurrency or a Ray run draws the same tokens for it."""
    digest = hashlib.sha256(b"vlmkit-batch-seed:" + custom_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


@dataclass
class BatchRequest:
    """One row of a batch file; ``size`` is its body's length as sent (``body_bytes``, for --max-body-bytes)."""

    custom_id: str | None
    method: str
    url: str
    body: object
    size: int = 0

    @classmethod
    def from_row(cls, row: dict) -> "BatchRequest":
        """A row from its parsed JSON object; a body without ``seed`` gets ``derived_seed(custom_id)``
        (greedy rows ignore it)."""
        custom_id = row_custom_id(row)
        body = row.get("body")
        size = body_bytes(body)  # before the derived seed: the limit is on what the row itself sends
        if isinstance(body, dict) and body.get("seed") is None:
            body = {**body, "seed": derived_seed(custom_id)}
        method, url = row.get("method", "POST"), row.get("url")
        return cls(custom_id, _field_text(method), _field_text(url), body, size)

    @classmethod
    def from_line(cls, line: str | bytes) -> "BatchRequest":
        """A row from its JSON line; raises ``BatchFileError`` when it cannot be read or has no usable custom_id."""
        return cls.from_row(parse_line(line))


def _field_text(value) -> str:
    """A row's method or url as text: "" when absent or null (``answer`` says so), else the text it gives."""
    return "" if value is None else value if isinstance(value, str) else repr(value)


def body_bytes(body) -> int:
    """A body's size as a client sends it: compact JSON in UTF-8, whatever escapes or spacing the row's
    line used, so every row (a line, Ray columns) is measured alike."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8", errors="surrogatepass"))


def read_requests(path, skip: set[str] = frozenset()) -> Iterator[BatchRequest]:
    """The rows of a checked input file (``scan_input``), in order, leaving out the custom_ids in ``skip``."""
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                request = BatchRequest.from_line(raw)
                if request.custom_id not in skip:
                    yield request


def check_concurrency(concurrency) -> None:
    """Refuse anything but a whole number of at least 1 rows in flight, with an ``InputError``."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InputError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")


class BatchWorker:
    """A model behind the server's request handler and scheduler; ``run`` keeps ``concurrency`` rows in
    flight (each prepared on its own thread, as the server's worker threads do, then decoded in the
    scheduler's shared batch) and yields each as it finishes."""

    def __init__(self, engine, config: ServeConfig, concurrency: int = 32):
        from ..serve.requests import RequestHandler
        from ..serve.scheduler import Scheduler

        check_concurrency(concurrency)
        self.engine = engine
        self.config = config
        self.concurrency = concurrency
        self.handler = RequestHandler(engine, config)
        # every in-flight row may wait for the model at once; none of them should ever be turned away
        self.scheduler = Scheduler(engine, max_batch_rows=config.max_batch_rows,
                                   max_batch_images=config.max_batch_images,
                                   max_waiting=max(config.max_waiting, concurrency)).start()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="vlmkit-batch")

    @classmethod
    def load(cls, config: ServeConfig, concurrency: int = 32) -> "BatchWorker":
        """Load ``config.model`` and start a worker on it (a bad ``concurrency`` is refused before loading)."""
        from ..engine import Engine
        check_concurrency(concurrency)
        engine = Engine.load(config.model, dtype=config.dtype, device=config.device, quantize=config.quantize)
        return cls(engine, config, concurrency)

    def answer(self, request: BatchRequest) -> tuple[int, dict]:
        """Run one row to completion: (status code, response or error body), as the server answers it."""
        from ..serve.api_errors import ApiError, api_error, body_too_large, method_not_allowed
        from ..serve.responses import error_body

        for field, value in (("url", request.url), ("method", request.method)):
            if not value:
                return 400, error_body(f"the row's {field} is missing or null; give {_GIVE[field]}", code="invalid_row")
        if request.method.upper() != "POST":  # the server's answer to any other method on its routes
            return 405, error_body(method_not_allowed(request.method, "POST"), code="405")
        limit = self.config.limits.max_body_bytes
        if request.size > limit:
            error = body_too_large(str(request.size), limit)
            return error.status, error.body()
        try:
            return self.handler.run(self.scheduler, request.url, request.body)
        except Exception as err:  # run() answers bad input itself; this is a fault, reported as the server would
            error = err if isinstance(err, ApiError) else api_error(err)
            return error.status, error.body()

    def run(self, requests: Iterable[BatchRequest]) -> Iterator[tuple[BatchRequest, int, dict]]:
        """(request, status, body) for every request, in the order they finish. ``requests`` is read
        lazily: at most ``concurrency`` rows are held at a time."""
        for finished in self.run_grouped(requests):
            yield from finished

    def run_grouped(self, requests: Iterable[BatchRequest]) -> Iterator[list[tuple[BatchRequest, int, dict]]]:
        """As ``run``, but the rows that finished together come as one list (one fsync for all of them)."""
        pending: dict = {}
        source = iter(requests)

        def fill() -> None:
            while len(pending) < self.concurrency:
                request = next(source, None)
                if request is None:
                    return
                pending[self._pool.submit(self.answer, request)] = request

        fill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            group = []
            for future in [f for f in pending if f in finished]:  # submission order among those done
                request = pending.pop(future)
                group.append((request, *future.result()))
            fill()  # the next rows start before the caller writes these
            yield group

    def close(self) -> None:
        """Stop the scheduler (rows still running fail at once) and the row threads."""
        self.scheduler.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BatchWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
