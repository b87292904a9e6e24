"""The benchmark behind ``vlmkit bench``: vlmkit against transformers on random-weight checkpoints of the
real architectures, installed with the package.

``run`` (the main table, ``vlmkit bench`` / ``python -m vlmkit.bench``), ``quantized`` (decode with
int8/int4/bitsandbytes weights and llama.cpp, ``python -m vlmkit.bench.quantized``), ``batch_throughput``
(rows/s of ``vlmkit batch``, ``python -m vlmkit.bench.batch_throughput``); ``checkpoints`` and
``tokenizer`` write the checkpoints, ``families`` drives each engine, ``measure`` and ``report`` time and
print. transformers is imported only inside functions: ``import vlmkit`` never needs it."""

from __future__ import annotations

import importlib.util

MISSING_TRANSFORMERS = "vlmkit bench compares against transformers: pip install 'vlmkit[bench]'"


def transformers_missing() -> str | None:
    """The one-line error to print when transformers is not installed, else None."""
    return MISSING_TRANSFORMERS if importlib.util.find_spec("transformers") is None else None
