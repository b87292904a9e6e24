"""A batch job on Ray Data: ``BatchPredictor`` is one model replica per actor, a callable class for
``Dataset.map_batches``; ``run_batch_on_ray`` is ``vlmkit batch --ray``.

The driver checks the input and recovers the output exactly as the local job does, puts the lines not
yet answered in Ray's object store (still JSON text, so images are decoded on the workers, not the
driver), streams them through a pool of replicas and appends each batch of results to the output as
it arrives. Ray is imported only here, and only when used (``pip install 'vlmkit[ray]'``)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np

from ..errors import VlmkitError
from ..serve.config import ServeConfig
from ..serve.responses import error_body
from .files import BatchFileError, ResultsFile, output_line, parse_line, scan_input
from .local import BatchReport, progress_bar
from .rows import BatchRequest, BatchWorker


class BatchPredictor:
    """One vlmkit model replica, for ``ray.data.Dataset.map_batches``::

        ds = ray.data.read_text("requests.jsonl")          # OpenAI batch lines, kept as text
        ds = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"model": "/models/janus"},
                            compute=ray.data.ActorPoolStrategy(size=2), batch_size=16)
        for row in ds.iter_rows():                         # custom_id, status_code, output (a JSON line)
            ...

    A batch holds either a ``text`` (or ``line``) column of OpenAI batch lines, or the columns
    ``custom_id``, ``url``, ``body`` (and optionally ``method``), ``body`` as an object or JSON text; a
    null field of an object body counts as absent (columnar readers fill missing fields with nulls).
    Each row comes back as ``custom_id``, ``status_code`` and ``output``, its OpenAI batch output line.
    The batch's rows run together on the model (``concurrency`` at a time)."""

    def __init__(self, model: str | None = None, *, config: ServeConfig | None = None, concurrency: int = 16,
                 **settings):
        """``config`` is a ``ServeConfig`` (limits, media policy, batching); ``settings`` are its fields
        for a config built here, ``model`` overrides its model."""
        config = config or ServeConfig(**settings)
        if model is not None:
            config = replace(config, model=model)
        if not config.model:
            raise VlmkitError("BatchPredictor needs a model: BatchPredictor(model=PATH) or a config with one")
        _match_threads_to_ray_cpus()
        self.worker = BatchWorker.load(config, concurrency)

    def __call__(self, batch: dict) -> dict:
        outputs: dict[int, tuple] = {}
        requests = []
        for index, item in enumerate(_batch_rows(batch)):
            if isinstance(item, BatchRequest):
                requests.append((index, item))
            else:  # (custom_id, message): a row that is not a request at all
                custom_id, message = item
                outputs[index] = (custom_id, 400, error_body(message, code="invalid_row"))
        order = {id(request): index for index, request in requests}
        for request, status, body in self.worker.run(request for _, request in requests):
            outputs[order[id(request)]] = (request.custom_id, status, body)
        rows = [outputs[i] for i in range(len(outputs))]
        return {"custom_id": np.array([r[0] or "" for r in rows], dtype=object),
                "status_code": np.array([r[1] for r in rows], dtype=np.int64),
                "output": np.array([json.dumps(output_line(*r), ensure_ascii=False, separators=(",", ":"))
                                    for r in rows], dtype=object)}

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            try:
                worker.close()
            except Exception:  # interpreter shutdown: the actor's process is going anyway
                pass


def _batch_rows(batch: dict):
    """Each row of a Ray batch as a ``BatchRequest``, or (custom_id, message) when it is not one."""
    lines = batch.get("text", batch.get("line"))
    size = len(next(iter(batch.values()))) if batch else 0
    for i in range(size):
        try:
            if lines is not None:  # read_text keeps a UTF-8 BOM, which json.loads(str) refuses
                yield BatchRequest.from_line(str(lines[i]).removeprefix("\ufeff"))
                continue
            row = {key: _plain(batch[key][i]) for key in ("custom_id", "method", "url", "body") if key in batch}
            row = {key: value for key, value in row.items() if value is not None}
            if isinstance(row.get("body"), str):
                row["body"] = parse_line(row["body"])
            yield BatchRequest.from_row(row)
        except (BatchFileError, json.JSONDecodeError) as err:
            custom_id = _row_id(batch, lines, i)
            yield (custom_id if isinstance(custom_id, str) else None, f"the row cannot be run: {err}")


def _row_id(batch: dict, lines, i: int):
    """The custom_id a row that cannot be run still names, so its error line is matched to it."""
    if lines is None:
        return _plain(batch["custom_id"][i]) if "custom_id" in batch else None
    try:
        row = parse_line(str(lines[i]).removeprefix("\ufeff"))
    except BatchFileError:
        return None
    return row.get("custom_id") if isinstance(row, dict) else None


def _plain(value):
    """A value from a Ray batch as plain JSON data: arrays become lists, numpy scalars Python ones, and
    nulls inside objects are dropped (a columnar reader's null means the field was absent)."""
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _match_threads_to_ray_cpus() -> None:
    """Inside a Ray actor, give torch as many threads as CPUs the actor holds (at least one)."""
    try:
        import ray
        if not ray.is_initialized():
            return
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        return
    if cpus:
        import torch
        torch.set_num_threads(max(1, int(cpus)))


def _input_blocks(path, done: set[str], rows_per_block: int, bytes_per_block: int = 16 * 1024 * 1024) -> list:
    """The input's lines not yet answered, put in the object store as blocks of text (one column,
    ``text``) by the driver, which holds one block at a time. Workers pull the blocks they are given,
    so no node but the driver's needs the file. A block is one replica's call (Ray hands a block to one
    actor and returns its rows together), so blocks are as small as a call: results stream back and
    every replica gets work."""
    import pyarrow as pa
    import ray

    refs, block, size = [], [], 0
    with open(path, "rb") as lines:
        for raw in lines:
            if not raw.strip() or json.loads(raw)["custom_id"] in done:  # the file was checked by scan_input
                continue
            block.append(_line_text(raw))
            size += len(raw)
            if len(block) >= rows_per_block or size >= bytes_per_block:
                refs.append(ray.put(pa.table({"text": block})))
                block, size = [], 0
    if block:
        refs.append(ray.put(pa.table({"text": block})))
    return refs


def _line_text(raw: bytes) -> str:
    """A checked input line as text for a worker, read as the local job reads it: a UTF-8 BOM dropped,
    and a line whose bytes are not strict UTF-8 (json accepts encoded surrogates) sent as the same JSON
    with escapes."""
    try:
        return raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        return json.dumps(parse_line(raw))


def run_batch_on_ray(config: ServeConfig, input_path, output_path, *, replicas: int = 1, address: str | None = None,
                     num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0, concurrency: int = 16,
                     progress: bool = True) -> BatchReport:
    """``vlmkit batch --ray``: the job of ``run_batch`` on a Ray cluster (``address``; none starts a local
    one, or joins the cluster ``ray.init`` already connected to), ``replicas`` model copies, each
    running ``concurrency`` rows at once. Resumable exactly as the local job."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise VlmkitError(f"vlmkit batch --ray needs Ray ({err.name} is missing): pip install 'vlmkit[ray]'") from None
    summary = scan_input(input_path)
    with ResultsFile(output_path) as results:
        done = results.open(summary.custom_ids, input_path)
        report = BatchReport(summary.total, len(done))
        if report.already_done == report.total:
            return report
        started = not ray.is_initialized()
        if started:
            ray.init(address=address)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # one bar at most: ours, over rows written (none when quiet)
            answered = ray.data.from_arrow_refs(_input_blocks(input_path, done, concurrency)).map_batches(
                BatchPredictor, fn_constructor_kwargs={"config": config, "concurrency": concurrency},
                compute=ray.data.ActorPoolStrategy(size=replicas), batch_size=concurrency,
                num_cpus=num_cpus_per_replica, num_gpus=num_gpus_per_replica or None)
            with progress_bar(summary.total, report.already_done, progress) as bar:
                for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
                    results.append(list(batch["output"]))
                    report.written += len(batch["output"])
                    report.errors += int((batch["status_code"] != 200).sum())
                    bar.update(len(batch["output"]))
                    if report.errors:
                        bar.set_postfix(errors=report.errors, refresh=False)
        finally:
            if started:
                ray.shutdown()
    if report.written + report.already_done < report.total:
        print(f"vlmkit batch: Ray returned {report.written} of {report.total - report.already_done} rows; run the "
              f"same command again to finish", file=sys.stderr)
    return report
