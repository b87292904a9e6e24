"""vlmkit.io.video: frame sampling (transformers' formula), every source kind and every error.

Test videos are made here with PyAV: 30 frames of 64x48 at 10 fps whose red channel is 8 * frame index,
so each returned frame says which frame it was.
"""

import http.server
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import MediaError
from vlmkit.io.media import MediaPolicy
from vlmkit.io.video import check_video_file, load_video, sample_indices

N, W, H = 30, 64, 48


def frame(i: int) -> np.ndarray:
    array = np.zeros((H, W, 3), np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = i * 8, 255 - i * 8, 128
    return array


def make_video(path, n: int = N, codec: str = "mpeg4", size=(W, H)) -> bytes:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.qmin, stream.codec_context.qmax = 1, 2  # near-lossless: colours survive
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i)[: size[1], : size[0]], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def indices_of(frames: np.ndarray) -> list[int]:
    return [int(round(f[..., 0].mean() / 8)) for f in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    out = {name: folder / name for name in ("clip.mp4", "clip.avi", "clip.mkv", "empty.avi")}
    make_video(out["clip.mp4"])
    make_video(out["clip.avi"])
    make_video(out["clip.mkv"], codec=codec)  # Matroska stores no frame count: it gets counted
    make_video(out["empty.avi"], n=0)
    return out


# ----------------------------------------------------------------------------------------- sampling


def test_sample_indices_formula():
    assert sample_indices(30, 8).tolist() == [0, 3, 7, 11, 15, 18, 22, 26]
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(30, fps=2, video_fps=10).tolist() == [0, 5, 10, 15, 20, 25]
    assert sample_indices(3, fps=0.1, video_fps=30).tolist() == [0]  # at least one frame
    with pytest.raises(MediaError, match="has only 5; ask for 5 or fewer"):
        sample_indices(5, 8)


def test_sample_indices_match_transformers():
    video_utils = pytest.importorskip("transformers.video_utils")
    for total, num in [(30, 8), (30, 30), (100, 7), (7, 3), (1, 1), (1000, 64)]:
        metadata = video_utils.VideoMetadata(total_num_frames=total, fps=25.0)
        expected = video_utils.default_sample_indices_fn(metadata, num_frames=num)
        assert sample_indices(total, num).tolist() == expected.tolist(), (total, num)
    for fps in (0.5, 1, 2.5, 25):
        metadata = video_utils.VideoMetadata(total_num_frames=300, fps=25.0)
        expected = video_utils.default_sample_indices_fn(metadata, fps=fps)
        assert sample_indices(300, fps=fps, video_fps=25.0).tolist() == expected.tolist(), fps


def test_uniform_sampling_picks_the_formula_frames(videos):
    frames = load_video(videos["clip.mp4"], 8)
    assert frames.shape == (8, H, W, 3) and frames.dtype == np.uint8
    assert indices_of(frames) == [0, 3, 7, 11, 15, 18, 22, 26]


def test_all_frames_when_no_sampling_is_asked(videos):
    assert indices_of(load_video(videos["clip.mp4"])) == list(range(N))


def test_fps_sampling_uses_the_video_frame_rate(videos):
    assert indices_of(load_video(videos["clip.mp4"], fps=2)) == [0, 5, 10, 15, 20, 25]


def test_containers_without_a_frame_count_are_counted(videos):
    assert indices_of(load_video(videos["clip.mkv"], 5)) == [0, 6, 12, 18, 24]
    assert indices_of(load_video(videos["clip.avi"], 5)) == [0, 6, 12, 18, 24]


# ------------------------------------------------------------------------------------- source kinds


def test_path_str_file_uri_and_bytes_sources(videos):
    path = videos["clip.mp4"]
    for source in (path, str(path), path.as_uri(), path.read_bytes()):
        assert indices_of(load_video(source, 3)) == [0, 10, 20], type(source)


def test_array_tensor_and_pil_list_sources_are_sampled_the_same_way():
    array = np.stack([frame(i) for i in range(N)])
    assert indices_of(load_video(array, 4)) == [0, 7, 15, 22]
    assert indices_of(load_video(torch.from_numpy(array), 4)) == [0, 7, 15, 22]
    pil = [Image.fromarray(f) for f in array]
    assert indices_of(load_video(pil, 4)) == [0, 7, 15, 22]
    assert load_video(array[:5]).shape == (5, H, W, 3)


def test_channels_first_videos_match_transformers_llava_onevision(llava_onevision_dir):
    """(T, C, H, W) arrays and tensors (torchcodec's layout) give transformers' pixel_values_videos."""
    pytest.importorskip("transformers")
    from builders.llava_onevision import reference_processor
    from fixtures_llava import moving_pattern

    from vlmkit.models.llava_onevision import LlavaOnevisionProcessor

    ref, ours = reference_processor(llava_onevision_dir), LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir)
    prompt = "<|im_start|>user <video>\nWhat?<|im_end|>"
    thwc = torch.from_numpy(np.stack([moving_pattern(i) for i in range(4)]))
    tchw = thwc.permute(0, 3, 1, 2).contiguous()
    for video in (tchw, tchw.numpy(), thwc):
        expected = ref(videos=video, text=prompt, return_tensors="pt")
        got = ours(videos=video, text=prompt)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist()
        torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_a_list_of_frame_tensors_is_one_video_as_in_transformers(llava_onevision_dir):
    """Frames given as 3-D tensors, (H, W, C) or (C, H, W), make one video, as PIL or numpy frames do."""
    pytest.importorskip("transformers")
    from builders.llava_onevision import reference_processor
    from fixtures_llava import moving_pattern

    from vlmkit.models.llava_onevision import LlavaOnevisionProcessor

    ref, ours = reference_processor(llava_onevision_dir), LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir)
    prompt = "<|im_start|>user <video>\nWhat?<|im_end|>"
    hwc = [torch.from_numpy(moving_pattern(i)) for i in range(4)]
    chw = [f.permute(2, 0, 1).contiguous() for f in hwc]
    for video in (hwc, chw, [f.numpy() for f in chw]):
        expected = ref(videos=video, text=prompt, return_tensors="pt")
        got = ours(videos=video, text=prompt)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist()
        assert torch.equal(got["pixel_values_videos"], expected["pixel_values_videos"])
        np.testing.assert_array_equal(load_video(video), np.stack([moving_pattern(i) for i in range(4)]))


def test_channel_layout_is_inferred_with_transformers_rule():
    """Dim 1 wins when both dim 1 and dim 3 could be channels, as infer_channel_dimension_format decides."""
    image_utils = pytest.importorskip("transformers.image_utils")
    frames = np.stack([frame(i) for i in range(4)])  # (4, 48, 64, 3)
    np.testing.assert_array_equal(load_video(frames.transpose(0, 3, 1, 2).copy()), frames)
    ambiguous = frames[:, :3, :3].transpose(0, 3, 1, 2).copy()  # (4, 3, 3, 3): either layout fits
    first = image_utils.ChannelDimension.FIRST
    assert image_utils.infer_channel_dimension_format(ambiguous) == first
    np.testing.assert_array_equal(load_video(ambiguous), ambiguous.transpose(0, 2, 3, 1))
    odd = np.zeros((4, 3, 5, 3), np.uint8)  # H = 5, W = 3: channels-first, not (H=3, W=5, C=3)
    assert image_utils.infer_channel_dimension_format(odd) == first and load_video(odd).shape == (4, 5, 3, 3)
    grey = frames[..., :1]  # (T, H, W, 1) and (T, 1, H, W): repeated into RGB, as tvF.grayscale_to_rgb does
    for video in (grey, grey.transpose(0, 3, 1, 2).copy()):
        np.testing.assert_array_equal(load_video(video), np.repeat(grey, 3, axis=-1))
    with pytest.raises(MediaError, match="frame too large"):
        load_video(np.zeros((4, 3, H, W), np.uint8), max_pixels_per_frame=1000)


class VideoHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/clip.mp4" else 404)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server(videos):
    VideoHandler.body = videos["clip.mp4"].read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), VideoHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_video_is_downloaded_under_the_policy(server):
    assert indices_of(load_video(f"{server}/clip.mp4", 3)) == [0, 10, 20]
    with pytest.raises(MediaError, match="too large"):
        load_video(f"{server}/clip.mp4", 3, policy=MediaPolicy(max_bytes=100))
    with pytest.raises(MediaError, match="HTTP error 404"):
        load_video(f"{server}/gone.mp4", 3)
    with pytest.raises(MediaError, match="refused private or internal address"):
        load_video(f"{server}/clip.mp4", 3, policy=MediaPolicy.server_default())


def test_local_files_follow_the_policy(videos):
    with pytest.raises(MediaError, match="local files are refused"):
        load_video(videos["clip.mp4"], 3, policy=MediaPolicy.server_default())
    with pytest.raises(MediaError, match="outside media_root"):
        load_video(videos["clip.mp4"], 3, policy=MediaPolicy(media_root=str(videos["clip.mp4"].parent / "sub")))


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        load_video(tmp_path / "nope.mp4")


def test_random_bytes_are_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="not a video"):
        load_video(junk, 2)


def test_text_named_like_an_image_is_not_a_readable_video_whatever_the_frame_count(tmp_path):
    # FFmpeg's image2 demuxer opens it by its name as a one-frame "video" it cannot decode
    notes = tmp_path / "notes.png"
    notes.write_text("hello, not a png\n")
    for frames in (8, 1):
        with pytest.raises(MediaError, match="not a readable video: FFmpeg cannot decode a frame of it") as caught:
            load_video(notes, frames)
        assert "frames requested" not in str(caught.value)
        with pytest.raises(MediaError, match="not a readable video"):
            check_video_file(notes, frames)


def test_a_still_image_asked_for_frames_is_called_an_image(tmp_path):
    Image.new("RGB", (16, 12), "red").save(tmp_path / "still.png")
    with pytest.raises(MediaError, match="this is a still image, not a video .8 frames requested, it has 1.; give it "
                                         "as an image"):
        load_video(tmp_path / "still.png", 8)
    assert load_video(tmp_path / "still.png", 1).shape == (1, 12, 16, 3)  # one frame is still fine


def test_check_video_file_refuses_what_load_video_would_and_counts_frames(videos):
    assert check_video_file(videos["clip.mp4"], 8) == N
    assert check_video_file(videos["clip.mkv"]) == N  # counted from its packets
    with pytest.raises(MediaError, match=f"{N + 1} frames requested but the video has only {N}"):
        check_video_file(videos["clip.mp4"], N + 1)
    with pytest.raises(MediaError, match="zero frames"):
        check_video_file(videos["empty.avi"], 1)
    with pytest.raises(MediaError, match="must be between 1 and max_frames=64"):
        check_video_file(videos["clip.mp4"], 100)


def test_truncated_videos_are_reported(videos):
    mp4 = videos["clip.mp4"].read_bytes()  # index at the end: half a file will not even open
    with pytest.raises(MediaError, match="not a video, or a corrupt one"):
        load_video(mp4[: len(mp4) // 2], 4)
    avi = videos["clip.avi"].read_bytes()  # header promises 30 frames the file no longer holds
    with pytest.raises(MediaError, match="truncated"):
        load_video(avi[: len(avi) * 2 // 3], 4)


def test_zero_frame_video(videos):
    with pytest.raises(MediaError, match="zero frames"):
        load_video(videos["empty.avi"], 1)


def test_frame_limits(videos):
    with pytest.raises(MediaError, match="max_frames=8"):
        load_video(videos["clip.mp4"], 9, max_frames=8)
    with pytest.raises(MediaError, match="30 frames requested, more than max_frames=16; pass num_frames"):
        load_video(videos["clip.mp4"], max_frames=16)
    with pytest.raises(MediaError, match="only 30"):
        load_video(videos["clip.mp4"], 31)
    with pytest.raises(MediaError, match="frame too large: 64x48"):
        load_video(videos["clip.mp4"], 2, max_pixels_per_frame=1000)
    with pytest.raises(MediaError, match="frame too large"):
        load_video(np.zeros((4, H, W, 3), np.uint8), max_pixels_per_frame=1000)


def test_bad_arguments_and_sources():
    with pytest.raises(MediaError, match="mutually exclusive"):
        load_video(np.zeros((4, H, W, 3), np.uint8), 2, fps=1)
    with pytest.raises(MediaError, match="frame rate"):
        load_video(np.zeros((4, H, W, 3), np.uint8), fps=1)
    for bad in (np.zeros((4, H, W), np.uint8), np.zeros((4, 2, H, W), np.uint8), np.zeros((4, H, W, 3), np.float32)):
        with pytest.raises(MediaError, match=r"uint8 \(T, H, W, C\) or \(T, C, H, W\)"):
            load_video(bad)
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        load_video("ftp://example.com/a.mp4")
    with pytest.raises(MediaError, match="differ in size"):
        load_video([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


def test_a_machine_without_pyav_gets_a_media_error_naming_it(videos, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(MediaError, match="needs PyAV"):
        load_video(videos["clip.mp4"], 8)


@pytest.mark.parametrize("layout", ["thwc_array", "thwc_tensor", "tchw_tensor"])
def test_a_five_dimensional_batch_is_one_video_per_row_as_in_transformers(llava_onevision_dir, layout):
    """A [B, T, H, W, C] (or [B, T, C, H, W]) array or tensor is B videos, as transformers splits it."""
    pytest.importorskip("transformers")
    from builders.llava_onevision import reference_processor
    from fixtures_llava import moving_pattern

    from vlmkit.models.llava_onevision import LlavaOnevisionProcessor

    ref, ours = reference_processor(llava_onevision_dir), LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir)
    prompt = "<|im_start|>user <video>\nWhat?<|im_end|>"
    batch = np.stack([np.stack([moving_pattern(i + shift) for i in range(3)]) for shift in (0, 5)])
    videos = {"thwc_array": batch, "thwc_tensor": torch.from_numpy(batch),
              "tchw_tensor": torch.from_numpy(batch).permute(0, 1, 4, 2, 3).contiguous()}[layout]
    expected = ref(videos=videos, text=[prompt, prompt], padding=True, return_tensors="pt")
    got = ours(videos=videos, text=[prompt, prompt], padding=True)
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert got["pixel_values_videos"].shape == expected["pixel_values_videos"].shape
    torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], rtol=0, atol=1e-6)
