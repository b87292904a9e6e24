"""Offline batch inference on the server's request path.

``files`` (the OpenAI batch input, the output and how a killed job resumes), ``rows`` (a row, its
derived seed, and ``BatchWorker``: a model behind the server's handler and scheduler), ``local``
(``vlmkit batch``), ``ray_data`` (``BatchPredictor`` for ``map_batches``, ``vlmkit batch --ray``),
``offline`` (``LLM``, vLLM's shape), ``command`` (the CLI). The benchmark's batch row lives in
``vlmkit.bench.batch_throughput``.

Names load on first use, so importing this package needs neither Ray nor the model code."""

from importlib import import_module

_LAZY = {
    "BatchFileError": "vlmkit.batch.files",
    "ResultsFile": "vlmkit.batch.files",
    "scan_input": "vlmkit.batch.files",
    "BatchRequest": "vlmkit.batch.rows",
    "BatchWorker": "vlmkit.batch.rows",
    "derived_seed": "vlmkit.batch.rows",
    "BatchReport": "vlmkit.batch.local",
    "run_batch": "vlmkit.batch.local",
    "BatchPredictor": "vlmkit.batch.ray_data",
    "run_batch_on_ray": "vlmkit.batch.ray_data",
    "LLM": "vlmkit.batch.offline",
    "SamplingParams": "vlmkit.batch.offline",
    "ChatOutput": "vlmkit.batch.offline",
    "CompletionOutput": "vlmkit.batch.offline",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmkit.batch' has no attribute {name!r}")


__all__ = list(_LAZY)
