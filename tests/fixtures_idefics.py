"""Session fixtures for the IDEFICS tests: the two tiny checkpoints, built once with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders.idefics import build_tiny_idefics


@pytest.fixture(scope="session")
def idefics_resampler_dir(tmp_path_factory) -> Path:
    """IDEFICS with the perceiver resampler, decoupled vocabulary, vector gates, qk norms, interval 2."""
    pytest.importorskip("transformers")
    return build_tiny_idefics(tmp_path_factory.mktemp("idefics_resampler"), use_resampler=True, seed=0)


@pytest.fixture(scope="session")
def idefics_plain_dir(tmp_path_factory) -> Path:
    """IDEFICS without the resampler: one vocabulary, float gates, a cross-attention layer per decoder layer."""
    pytest.importorskip("transformers")
    return build_tiny_idefics(tmp_path_factory.mktemp("idefics_plain"), use_resampler=False, seed=1)
