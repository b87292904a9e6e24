"""Video frames for the vision models, decoded with PyAV under the same `MediaPolicy` as images.

This module owns turning a video source (local path, ``file://``, ``http(s)://`` URL, ``data:`` URI, encoded
bytes, a (T, H, W, 3) or (T, 3, H, W) array or tensor, or a list of frames) into a (T, H, W, 3) uint8 numpy
array of uniformly sampled frames. Decoding streams through the file and keeps only the sampled frames, so
memory stays at ``T * H * W * 3`` bytes however long the video is.

Frames held in memory cross the request path losslessly as a ``data:application/x-npy;base64,...`` URI
(``FRAMES_MEDIA_TYPE``): numpy's .npy format of a uint8 array, read back bit-exactly (`frames_data_uri`
writes one; `load_video` reads it, header checked before the payload is used, never unpickled).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile

import numpy as np

from vlmkit.errors import MediaError, TooManyPixels
from vlmkit.io.media import (MediaPolicy, data_uri_payload, is_tensor, load_image, resolve_local_path, source_scheme,
                             to_rgb)
from vlmkit.io.net import describe_source, fetch_url

FRAMES_MEDIA_TYPE = "application/x-npy"  # a data: URI of this type holds frames as a .npy array
_LAYOUT = "uint8 (T, H, W, C) or (T, C, H, W) with C 3 (RGB) or 1 (grey)"


class TooManyFrames(MediaError):
    """A video would give more frames than ``max_frames`` allows."""


def is_frames_uri(source) -> bool:
    """Whether `source` is a ``data:`` URI of frames (``FRAMES_MEDIA_TYPE``), which are used as they are
    unless a frame count is asked for, as transformers' processor takes a frames array."""
    return isinstance(source, str) and source[:5].lower() == "data:" and \
        source[5:].split(";", 1)[0].split(",", 1)[0].strip().lower() == FRAMES_MEDIA_TYPE


def frames_data_uri(frames) -> str:
    """Frames held in memory (a uint8 array or tensor laid out as `load_video` takes it, or a list of frames:
    PIL images or (H, W, C) arrays) as a lossless ``data:application/x-npy;base64,...`` URI, checked as the
    reader will check it; ``MediaError`` names what is wrong."""
    from PIL import Image

    if isinstance(frames, (list, tuple)):
        if not frames:
            raise MediaError("the video has no frames; give at least one")
        frames = [np.asarray(to_rgb(f)) if isinstance(f, Image.Image) else
                  f.detach().cpu().numpy() if is_tensor(f) else f for f in frames]
        if not all(isinstance(f, np.ndarray) for f in frames):
            kinds = sorted({type(f).__name__ for f in frames if not isinstance(f, np.ndarray)})
            raise MediaError(f"video frames must be PIL images, numpy arrays or tensors, got {', '.join(kinds)}")
        if len({(f.shape, f.dtype) for f in frames}) > 1:
            raise MediaError(f"video frames differ in size or dtype: {sorted({(f.shape, str(f.dtype)) for f in frames})}")
        frames = np.stack(frames)
    elif is_tensor(frames):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise MediaError(f"video frames must be a numpy array, a tensor or a list of frames, got "
                         f"{type(frames).__name__}")
    _check_layout(frames.shape, frames.dtype, "the frames given")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
    return f"data:{FRAMES_MEDIA_TYPE};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
    A ``data:`` URI holds encoded video (``video/*``) or frames (``FRAMES_MEDIA_TYPE``, a .npy array).
    `num_frames` and `fps` are exclusive; with neither, every frame is returned. More than `max_frames`
    frames (`TooManyFrames`), or frames over `max_pixels_per_frame` (``TooManyPixels``), raise `MediaError`,
    as do missing, corrupt, truncated and zero-frame videos. Rotation metadata is not applied.
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
        if scheme == "data":
            return _from_data_uri(source, policy, limits)
        if scheme not in (None, "file"):
            raise MediaError(f"unsupported URL scheme {scheme!r} for a video (use http, https, file or data): {desc}")
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
        raise TooManyFrames(f"{len(indices)} frames requested, more than max_frames={max_frames}{hint}: {desc}")
    return indices


def _check_size(height, width, max_pixels, desc):
    if height * width > max_pixels:
        raise TooManyPixels(f"video frame too large: {width}x{height} > max_pixels_per_frame={max_pixels}: {desc}")


def _check_layout(shape, dtype, desc) -> None:
    if len(shape) != 4 or dtype != np.uint8 or not ({shape[1], shape[3]} & {1, 3}):
        what = "" if len(shape) == 4 else " (one frame?)" if len(shape) == 3 else f" ({len(shape)}-D)"
        raise MediaError(f"video frames must be {_LAYOUT}, got shape {tuple(shape)}{what} of dtype {dtype}: {desc}")


def _from_data_uri(uri, policy, limits) -> np.ndarray:
    """A ``data:`` URI's video: .npy frames (``FRAMES_MEDIA_TYPE``) or an encoded video file (``video/*``)."""
    desc = limits[-1]
    media_type, data = data_uri_payload(uri, policy, desc, "video", ("video/", FRAMES_MEDIA_TYPE),
                                        f"; send video/... file bytes, or frames as {FRAMES_MEDIA_TYPE} (a .npy "
                                        f"uint8 array)")
    if media_type == FRAMES_MEDIA_TYPE:
        return _from_array(_npy_frames(data, desc), *limits)
    return _decode(io.BytesIO(data), *limits)


def _npy_frames(data: bytes, desc: str) -> np.ndarray:
    """The uint8 array of a .npy payload, read without copying: its header is checked (dtype, layout, and that
    the payload holds exactly that many bytes) before anything is allocated for it; never unpickled."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = read_header(stream)
    except ValueError as e:
        raise MediaError(f"the {FRAMES_MEDIA_TYPE} data is not a .npy array ({e}): {desc}") from None
    _check_layout(shape, dtype, desc)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - stream.tell() != count:
        raise MediaError(f"the .npy header says {count} bytes of frames {tuple(shape)}, but "
                         f"{len(data) - stream.tell()} follow it (truncated or padded): {desc}")
    return np.frombuffer(data, np.uint8, count, stream.tell()).reshape(shape, order="F" if fortran_order else "C")


def _from_array(array, num_frames, fps, max_frames, max_pixels, desc) -> np.ndarray:
    _check_layout(array.shape, array.dtype, desc)
    # transformers' rule (infer_channel_dimension_format with 1 or 3 channels): channels-first when dim 1
    # could be channels, even if dim 3 could be too; torchcodec and torchvision's TCHW output give that layout
    channels_first = array.shape[1] in (1, 3)
    height, width = array.shape[2:] if channels_first else array.shape[1:3]
    _check_size(height, width, max_pixels, desc)
    if not height or not width:  # every processor divides by a side
        raise MediaError(f"video frames are {width}x{height} pixels, so there is nothing to see: {desc}")
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
    this before the model loads; what it learns is kept for `load_video` of the same, unchanged file."""
    desc = describe_source(path)
    if num_frames is not None and not 1 <= num_frames <= max_frames:
        raise MediaError(f"num_frames={num_frames} requested; it must be between 1 and max_frames={max_frames}")
    av = _pyav()
    file = os.fspath(path)
    try:
        facts = _probe(file, max_pixels_per_frame, desc)
    except av.FFmpegError as e:
        raise MediaError(f"corrupt video, decoding failed ({e}): {desc}") from e
    _sampled_indices(facts, num_frames, fps, max_frames, desc)
    key = _file_key(file)
    if key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))  # the oldest
        _CHECKED[key] = facts
    return facts[0]


# What `check_video_file` learned of a local file (frame count, frame rate, whether it is a still image), so
# that decoding it later does not read the container again (for MKV and WebM, a pass over the whole file to
# count packets). Keyed on the file's identity and stat, so a file changed since is read afresh; no frames
# are kept. Only the CLI checks files, so a server never fills it.
_CHECKED: dict[tuple, tuple[int, float | None, bool]] = {}
_CHECKED_MAX = 16


def _file_key(file) -> tuple | None:
    if not isinstance(file, str):
        return None
    try:
        stat = os.stat(file)
    except OSError:
        return None
    return os.path.realpath(file), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _probe(file, max_pixels, desc) -> tuple[int, float | None, bool]:
    """(frame count, frame rate or None, whether it is a still image) from the container, decoding nothing
    unless its size is unknown; ``MediaError`` for a file that is no readable video."""
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
    return total, video_fps, still


def _sampled_indices(facts, num_frames, fps, max_frames, desc) -> np.ndarray:
    """The indices of the frames to keep, from `_probe`'s facts; ``MediaError`` for too few frames."""
    total, video_fps, still = facts
    if still and total == 1 and num_frames and num_frames > 1:
        raise MediaError(f"this is a still image, not a video ({num_frames} frames requested, it has 1); give it "
                         f"as an image (--image, an image part): {desc}")
    return _select(total, num_frames, fps, max_frames, desc, video_fps)


def _decode(file, num_frames, fps, max_frames, max_pixels, desc) -> np.ndarray:
    av = _pyav()
    try:
        key = _file_key(file)
        facts = _CHECKED.get(key) if key is not None else None
        facts = facts or _probe(file, max_pixels, desc)  # frame sizes are checked below, as they are decoded
        indices, total = _sampled_indices(facts, num_frames, fps, max_frames, desc), facts[0]
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
