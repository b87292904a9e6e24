"""Video frames for the vision models, decoded with PyAV under the same `MediaPolicy` as images.

This module owns turning a video source (local path, ``file://``, ``http(s)://`` URL, encoded bytes, a
(T, H, W, 3) or (T, 3, H, W) array or tensor, or a list of frames) into a (T, H, W, 3) uint8 numpy array
of uniformly sampled frames. Decoding streams through the file and keeps only the sampled frames, so
memory stays at ``T * H * W * 3`` bytes however long the video is.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from vlmkit.errors import MediaError
from vlmkit.io.media import MediaPolicy, is_tensor, load_image, resolve_local_path, source_scheme
from vlmkit.io.net import describe_source, fetch_url


def sample_indices(
    total_frames: int, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None
) -> np.ndarray:
    """Indices of the frames to keep, with transformers' formula (``video_utils.default_sample_indices_fn``).

    With `num_frames`: ``np.arange(num_frames) * total_frames // num_frames``. With `fps` instead:
    ``num_frames = max(1, int(total_frames / video_fps * fps))``, then the same. With neither: every frame.
    Asking for more frames than the video has is an error, as it is in transformers.
    """
    if num_frames is None and fps is not None:
        if not video_fps:
            raise MediaError(f"cannot sample at fps={fps}: the video's own frame rate is unknown")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames, dtype=int)
    if num_frames > total_frames:
        raise MediaError(f"{num_frames} frames requested but the video has only {total_frames}; ask for "
                         f"{total_frames} or fewer (--frames, num_frames)")
    return np.arange(num_frames, dtype=int) * total_frames // num_frames


def load_video(
    source,
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int = 64,
    max_pixels_per_frame: int = 8_000_000,
    policy: MediaPolicy | None = None,
) -> np.ndarray:
    """Load `source` as a (T, H, W, 3) uint8 RGB array of frames sampled by `sample_indices`.

    `source` is a local path or ``file://`` URI (checked with the policy's local-file rules), an
    ``http(s)://`` URL (downloaded to a temporary file under the policy's byte, time, redirect and
    address limits), encoded video bytes, a uint8 array or tensor laid out (T, H, W, C) or (T, C, H, W)
    (torchcodec's layout; C is 3, or 1 for grey; channels-first wins ties, as in transformers), or a list of
    frames (anything `load_image` takes). ``max_bytes`` caps downloads and bytes, not local files.
    `num_frames` and `fps` are exclusive; with neither, every frame is returned. More than `max_frames`
    frames, or frames over `max_pixels_per_frame`, raise `MediaError`, as do missing, corrupt, truncated
    and zero-frame videos. Rotation metadata is not applied.
    """
    policy = policy or MediaPolicy()
    desc = describe_source(source)
    if num_frames is not None and fps is not None:
        raise MediaError("num_frames and fps are mutually exclusive: pass one of them")
    if num_frames is not None and not 1 <= num_frames <= max_frames:
        raise MediaError(f"num_frames={num_frames} requested; it must be between 1 and max_frames={max_frames}")
    limits = (num_frames, fps, max_frames, max_pixels_per_frame, desc)

    if is_tensor(source):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _from_array(source, *limits)
    if isinstance(source, (list, tuple)):
        return _from_frames(source, policy, *limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > policy.max_bytes:
            raise MediaError(f"video is too large: over max_bytes={policy.max_bytes}: {desc}")
        return _decode(io.BytesIO(bytes(source)), *limits)
    if isinstance(source, str):
        scheme = source_scheme(source)
        if scheme in ("http", "https"):
            with tempfile.TemporaryFile() as tmp:  # on disk, not in memory; deleted on close
                fetch_url(source, tmp, policy)
                tmp.seek(0)
                return _decode(tmp, *limits)
        if scheme not in (None, "file"):
            raise MediaError(f"unsupported URL scheme {scheme!r} for a video (use http, https or file): {desc}")
    elif not isinstance(source, os.PathLike):
        raise MediaError(f"unsupported video source type {type(source).__name__}: {desc}")
    return _decode(resolve_local_path(source, policy), *limits)


def _select(total, num_frames, fps, max_frames, desc, video_fps=None) -> np.ndarray:
    if total == 0:
        raise MediaError(f"video has zero frames: {desc}")
    try:
        indices = sample_indices(total, num_frames, fps, video_fps)
    except MediaError as e:
        raise MediaError(f"{e}: {desc}") from None
    if len(indices) > max_frames:
        hint = "" if num_frames or fps else "; pass num_frames or fps to sample fewer"
        raise MediaError(f"{len(indices)} frames requested, more than max_frames={max_frames}{hint}: {desc}")
    return indices


def _check_size(height, width, max_pixels, desc):
    if height * width > max_pixels:
        raise MediaError(f"video frame too large: {width}x{height} > max_pixels_per_frame={max_pixels}: {desc}")


def _from_array(array, num_frames, fps, max_frames, max_pixels, desc) -> np.ndarray:
    if array.ndim != 4 or array.dtype != np.uint8 or not ({array.shape[1], array.shape[3]} & {1, 3}):
        raise MediaError(f"video array must be uint8 (T, H, W, C) or (T, C, H, W) with C 3 (RGB) or 1 (grey), "
                         f"got {array.shape} {array.dtype}: {desc}")
    # transformers' rule (infer_channel_dimension_format with 1 or 3 channels): channels-first when dim 1
    # could be channels, even if dim 3 could be too; torchcodec and torchvision's TCHW output give that layout
    channels_first = array.shape[1] in (1, 3)
    height, width = array.shape[2:] if channels_first else array.shape[1:3]
    _check_size(height, width, max_pixels, desc)
    frames = array[_select(len(array), num_frames, fps, max_frames, desc)]  # only kept frames are copied
    if channels_first:
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] == 1:  # grey, repeated into RGB as transformers' grayscale_to_rgb does
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def _from_frames(frames, policy, num_frames, fps, max_frames, max_pixels, desc) -> np.ndarray:
    indices = _select(len(frames), num_frames, fps, max_frames, desc)
    arrays = [np.asarray(load_image(frames[i], policy)) for i in indices]  # load only the kept frames
    for array in arrays:
        _check_size(array.shape[0], array.shape[1], max_pixels, desc)
    if len({array.shape for array in arrays}) > 1:
        raise MediaError(f"video frames differ in size: {sorted({a.shape for a in arrays})}: {desc}")
    return np.stack(arrays)


def _pyav():
    # imported on first use: images-only users (and machines without FFmpeg libraries) never need it
    try:
        import av
    except ImportError as e:
        raise MediaError(f"reading video files needs PyAV (pip install av): {e}") from None
    return av


def _open(file, desc: str):
    av = _pyav()
    if hasattr(file, "seek"):
        file.seek(0)
    try:
        return av.open(file, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"not a video, or a corrupt one ({e}): {desc}") from e


def check_video_file(path, num_frames: int | None = None, *, fps: float | None = None, max_frames: int = 64,
                     max_pixels_per_frame: int = 8_000_000) -> int:
    """Raise ``MediaError`` now for whatever `load_video` would refuse about the local video at `path` with
    these settings (not a video, no video stream, undecodable, too few frames, frames too large), reading
    its header and packets and decoding at most one frame; returns its frame count. ``vlmkit chat`` calls
    this before the model loads."""
    desc = describe_source(path)
    if num_frames is not None and not 1 <= num_frames <= max_frames:
        raise MediaError(f"num_frames={num_frames} requested; it must be between 1 and max_frames={max_frames}")
    av = _pyav()
    try:
        _, total = _sampled_indices(os.fspath(path), num_frames, fps, max_frames, max_pixels_per_frame, desc)
    except av.FFmpegError as e:
        raise MediaError(f"corrupt video, decoding failed ({e}): {desc}") from e
    return total


def _sampled_indices(file, num_frames, fps, max_frames, max_pixels, desc) -> tuple[np.ndarray, int]:
    """The indices of the frames to keep and the frame count, from the container (decoding nothing, unless
    its size is unknown); ``MediaError`` for a file that is no readable video or has too few frames."""
    with _open(file, desc) as container:
        if not container.streams.video:
            raise MediaError(f"file has no video stream: {desc}")
        stream = container.streams.video[0]
        unsized = not (stream.width and stream.height)
        still = container.format.name == "image2" or container.format.name.endswith("_pipe")  # PNG, JPEG...
        _check_size(stream.height, stream.width, max_pixels, desc)
        # The container's frame count, as transformers' PyAV reader uses; some formats (MKV, WebM) leave
        # it 0, so count packets then: demuxing reads the file but decodes nothing.
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        video_fps = float(stream.average_rate) if stream.average_rate else None
    if unsized:  # FFmpeg's probe found no frame size: most likely not a video at all (text named .png)
        _check_decodable(file, desc)
    if still and total == 1 and num_frames and num_frames > 1:
        raise MediaError(f"this is a still image, not a video ({num_frames} frames requested, it has 1); give it "
                         f"as an image (--image, an image part): {desc}")
    return _select(total, num_frames, fps, max_frames, desc, video_fps), total


def _decode(file, num_frames, fps, max_frames, max_pixels, desc) -> np.ndarray:
    av = _pyav()
    try:
        indices, total = _sampled_indices(file, num_frames, fps, max_frames, max_pixels, desc)
        frames, seen = [], 0
        with _open(file, desc) as container:  # a fresh open is simpler and surer than seeking back
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for seen, frame in enumerate(container.decode(stream), start=1):
                if seen - 1 == indices[len(frames)]:
                    _check_size(frame.height, frame.width, max_pixels, desc)
                    frames.append(frame.to_ndarray(format="rgb24"))  # only kept frames are converted and kept
                    if len(frames) == len(indices):
                        break
    except av.FFmpegError as e:
        raise MediaError(f"corrupt video, decoding failed ({e}): {desc}") from e
    if len(frames) < len(indices):
        raise MediaError(f"video ended after {seen} decodable frames of {total} (truncated or corrupt): {desc}")
    if len({frame.shape for frame in frames}) > 1:
        raise MediaError(f"video frames change size mid-stream: {desc}")
    return np.stack(frames)


def _check_decodable(file, desc: str) -> None:
    """Decode the first frame, or raise ``MediaError`` saying the file is not a readable video (rather than
    letting the frame count that such a file reports blame --frames)."""
    av = _pyav()
    with _open(file, desc) as container:
        try:
            next(container.decode(container.streams.video[0]))
            return
        except (av.FFmpegError, StopIteration) as e:
            reason = f" ({e})" if str(e) else ""
    raise MediaError(f"not a readable video: FFmpeg cannot decode a frame of it{reason}; give a video file "
                     f"(mp4, webm, mkv, ...): {desc}")
