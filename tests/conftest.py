"""Shared fixtures: tiny random checkpoints built once per session (no network), sample images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # `builders` is importable whatever pytest's import mode
    sys.path.insert(0, str(_TESTS_DIR))

from builders.janus import build_tiny_janus, write_original_layout  # noqa: E402


@pytest.fixture(scope="session")
def janus_dir(tmp_path_factory) -> Path:
    """Tiny Janus-Pro checkpoint in the Transformers layout (seed 0, 32 px images, 16 image tokens)."""
    return build_tiny_janus(tmp_path_factory.mktemp("janus_hf"), seed=0)


@pytest.fixture(scope="session")
def janus_original_dir(janus_dir, tmp_path_factory) -> Path:
    """The same weights in DeepSeek's original `deepseek-ai/Janus-Pro` layout (pytorch_model.bin)."""
    return write_original_layout(janus_dir, tmp_path_factory.mktemp("janus_original"), weights="bin")


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Deterministic RGB uint8 array [height, width, 3]: two gradients plus noise."""
    rng = np.random.default_rng(seed)
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(255, 0, height)[:, None], (height, width))
    noise = rng.integers(0, 256, (height, width))
    return np.stack([x, y, noise], axis=-1).round().astype(np.uint8)


@pytest.fixture(scope="session")
def sample_images() -> dict[str, Image.Image]:
    """PIL images made in code. Sizes are PIL (width, height).

    square RGB 40x40, wide RGB 64x20, tall RGB 20x64, tiny RGB 3x5, gray "L" 36x28,
    rgba "RGBA" 30x40 (alpha ramp), palette "P" 44x32 (16 colours).
    """
    rgba = np.concatenate(
        [_pattern(30, 40, 5), np.linspace(0, 255, 30 * 40).reshape(40, 30, 1).round().astype(np.uint8)], axis=-1
    )
    return {
        "square": Image.fromarray(_pattern(40, 40, 0), "RGB"),
        "wide": Image.fromarray(_pattern(64, 20, 1), "RGB"),
        "tall": Image.fromarray(_pattern(20, 64, 2), "RGB"),
        "tiny": Image.fromarray(_pattern(3, 5, 3), "RGB"),
        "gray": Image.fromarray(_pattern(36, 28, 4), "RGB").convert("L"),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "palette": Image.fromarray(_pattern(44, 32, 6), "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
    }


# session fixtures of the LLaVA-OneVision and IDEFICS tests (tests/fixtures_llava.py, tests/fixtures_idefics.py)
pytest_plugins = ["fixtures_llava", "fixtures_idefics"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from threads, and on a busy
    2-core machine OpenMP threads spinning against other processes make each small op ~40x slower. A
    module asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
