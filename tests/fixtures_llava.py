"""Session fixtures for the LLaVA-OneVision tests: tiny checkpoints (built once with transformers),
the reference and vlmkit processors/models on them, and test videos made with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SAMPLE_FRAMES, FRAME_WIDTH, FRAME_HEIGHT = 20, 64, 48


@pytest.fixture(scope="session")
def llava_onevision_dir(tmp_path_factory) -> Path:
    """Tiny LLaVA-OneVision (seed 0): SigLIP 42 px / 8 px patches (5 x 5 grid), 2+2 layers, untied head."""
    from builders.llava_onevision import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("onevision"), seed=0)


@pytest.fixture(scope="session")
def llava_onevision_tied_dir(tmp_path_factory) -> Path:
    """A variant with a tied LM head (no lm_head.weight saved) and features from two tower layers."""
    from builders.llava_onevision import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("onevision_tied"), seed=1, tie_word_embeddings=True,
                                      vision_feature_layer=[-2, -1], vision_num_layers=3)


@pytest.fixture(scope="session")
def onevision_reference(llava_onevision_dir):
    """(processor, model) from transformers."""
    import torch
    from builders.llava_onevision import reference_processor
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, dtype=torch.float32).eval()
    return reference_processor(llava_onevision_dir), model


@pytest.fixture(scope="session")
def onevision_vlmkit(llava_onevision_dir):
    """(processor, model) from vlmkit."""
    import torch
    from vlmkit.models.llava_onevision import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, dtype=torch.float32)
    return LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir), model


def moving_pattern(index: int, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT) -> np.ndarray:
    """Frame ``index`` of a smooth moving pattern (survives mpeg4 compression), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 127.5 + 127.5 * np.sin((x + 3 * index) / 7.0)
    green = 127.5 + 127.5 * np.cos((y - 2 * index) / 5.0)
    blue = (x * 4 + y * 2 + index * 12) % 256
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def write_video(path: Path, num_frames: int = SAMPLE_FRAMES) -> Path:
    """An mpeg4 clip of ``num_frames`` frames of ``moving_pattern`` at 10 fps (0 frames: header only)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = FRAME_WIDTH, FRAME_HEIGHT, "yuv420p"
        stream.codec_context.qmin, stream.codec_context.qmax = 1, 2
        container.start_encoding()
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(moving_pattern(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def onevision_videos(tmp_path_factory) -> dict[str, Path]:
    """clip.mp4 (20 frames 64x48), empty.avi (no frames), corrupt.mp4 (the clip's bytes scrambled)."""
    folder = tmp_path_factory.mktemp("onevision_videos")
    clip = write_video(folder / "clip.mp4")
    # an AVI keeps its video stream with no frames in it (an empty MP4 loses the track altogether)
    empty = write_video(folder / "empty.avi", num_frames=0)
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(0)
    data[:] = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()  # same length, no container left
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    return {"clip": clip, "empty": empty, "corrupt": corrupt}
