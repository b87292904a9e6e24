"""Images from anywhere a request may name them, loaded safely.

This module owns turning an image source (PIL image, numpy array, torch tensor, local path, ``file://``,
``data:`` URI or ``http(s)://`` URL) into an RGB ``PIL.Image``, and applying the :class:`MediaPolicy` limits
(media_policy.py) on the way: file confinement, byte and pixel caps, timeouts, redirects and refusal of private
network addresses (SSRF, enforced by ``net.py``'s HTTP client). ``video.py`` reuses its path helpers so
videos obey the same policy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import sys
import warnings
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.errors import MediaError, TooManyPixels
from vlmkit.io.media_policy import MediaPolicy
from vlmkit.io.net import check_address, describe_source, fetch_url  # noqa: F401 (check_address: re-exported)

# Decoders we let Pillow use on untrusted bytes; EPS and friends can shell out to Ghostscript.
_SAFE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "AVIF", "HEIF")
# marks an image made from float values in [0, 1]: they were scaled to 0..255 to become a picture
FROM_FLOAT = "vlmkit.from_float"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # 2+ chars, so "C:\x.png" stays a path
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_\s-]+={0,2}")  # standard or URL-safe, wrapped or not; linear to match
_LONGEST_PATH = 4096  # PATH_MAX on Linux: a longer string is never a file name
_SOURCES_ACCEPTED = ("a path to an existing file, a file://, http(s):// or data:image/...;base64 URI, "
                     "or base64-encoded image bytes")


def source_scheme(source: str) -> str | None:
    """The URI scheme a source string starts with, lower-cased (``"data"``, ``"https"``), or None for a path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def load_image(source, policy: MediaPolicy | None = None, *, upright: bool = False,
               on_white: bool = False) -> Image.Image:
    """Load `source` as an RGB ``PIL.Image``.

    Accepts a PIL image, a numpy array or torch tensor (HxW, HxWxC or CxHxW, C in 1/3/4; uint8, or float
    in [0, 1] or of whole numbers in [0, 255]; channels-first wins ties, as in transformers), encoded image bytes, a local path (str or
    PathLike), a ``file://`` URI, a base64 ``data:image/...`` URI, an ``http(s)://`` URL, or a string of
    base64-encoded image bytes (a string is a path first, as in ``transformers.image_utils.load_image``).
    EXIF orientation is applied to everything decoded here (files, URLs, bytes, base64), as transformers'
    ``load_image`` does; a PIL image given as it is keeps its pixels as they are, as transformers' processors
    keep an image passed to ``images=``, unless `upright` asks for its orientation tag to be applied too.
    Colours of images and arrays given as they are are converted by `to_rgb` (transparency composited onto
    white, as transformers' processors do); decoded ones as transformers' ``load_image`` converts them, an
    alpha band dropped, unless `on_white` asks for `to_rgb` (as vLLM's server loads images).
    Raises `MediaError` for anything missing, malformed, empty, refused by `policy` or over its limits.
    """
    desc = describe_source(source)
    image = _load_image(source, policy or MediaPolicy(), desc, upright)
    if image.mode != "RGB":  # decoded, in its own mode
        image = to_rgb(image) if on_white or image.mode.startswith("I;16") else image.convert("RGB")
    if 0 in image.size:  # every processor divides by a side
        raise MediaError(f"the image is {image.width}x{image.height} pixels, so there is nothing to see; give an "
                         f"image at least 1x1: {desc}")
    return image


def _load_image(source, policy: MediaPolicy, desc: str, upright: bool) -> Image.Image:
    if isinstance(source, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(source) if upright else source)
        except (OSError, SyntaxError, ValueError) as e:  # a lazily opened image can still fail to decode
            raise MediaError(f"corrupt or truncated image ({e}): {desc}") from e
    if isinstance(source, np.ndarray) or is_tensor(source):
        return _array_to_image(source, desc)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), policy, desc)
    if isinstance(source, str):
        scheme = source_scheme(source)
        if scheme in ("http", "https"):
            buf = io.BytesIO()
            fetch_url(source, buf, policy)
            return _decode(buf.getvalue(), policy, desc)
        if scheme == "data":
            return _decode(data_uri_payload(source, policy, desc)[1], policy, desc)
        if scheme is None:
            return _path_or_base64(source, policy, desc)
        if scheme != "file":
            raise MediaError(f"unsupported URL scheme {scheme!r} (use http, https, file or data): {desc}")
    elif not isinstance(source, os.PathLike):
        raise MediaError(f"unsupported image source type {type(source).__name__}: {desc}")
    return _read_file(resolve_local_path(source, policy), policy, desc)


def load_images(sources, policy: MediaPolicy | None = None) -> list[Image.Image]:
    """Load each of `sources` with `load_image` under the same policy."""
    return [load_image(source, policy) for source in sources]


def flat_image_list(images) -> list:
    """One image, a list of images, or a list of per-sample lists, as one flat list.

    The nesting is what transformers' ``make_flat_list_of_images`` takes (``[[a], [b, c]]`` is a batch of
    two samples; a 4-D array or tensor is a batch of images); image processors that see each image alone
    only need the images in order.
    """
    if not isinstance(images, (list, tuple)):
        return _batch_split(images)
    if images and all(isinstance(group, (list, tuple)) for group in images):
        return [image for group in images for item in group for image in _batch_split(item)]
    return [image for item in images for image in _batch_split(item)]


def _batch_split(item) -> list:
    """A 4-D array or tensor [N, H, W, C] / [N, C, H, W] as its N images; anything else as itself."""
    if (isinstance(item, np.ndarray) or is_tensor(item)) and item.ndim == 4:
        return list(item)
    return [item]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB, as transformers' ``image_transforms.convert_to_rgb`` does.

    Images with an alpha band (RGBA, LA, PA) or a ``transparency`` entry (P, L or RGB with tRNS) are
    composited onto white; every other mode (L, 1, P, CMYK, YCbCr, I, F) uses ``Image.convert("RGB")``.
    One deliberate difference: 16-bit greyscale ("I;16*") is scaled to 8 bits instead of being clipped
    at 255, which would turn most 16-bit images white.
    """
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_content_hash(image: Image.Image) -> str:
    """A stable hex digest of an image's mode, size and pixel bytes, for caching per-image work.

    SHA-256 is as fast as anything in hashlib, and collision-resistant: a crafted image cannot alias another
    user's cached vision features.
    """
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def resolve_local_path(source: str | os.PathLike, policy: MediaPolicy) -> str:
    """Return the real path of a local file or ``file://`` URI after checking it against `policy`.

    With ``media_root`` set, relative paths start from it and the fully resolved path (symlinks and ``..``
    included) must lie inside it; that is checked before existence, so nothing outside the root is revealed.
    """
    desc = describe_source(source)
    if not policy.allow_local_files:
        raise MediaError(f"local files are refused by the media policy: {desc}")
    text = os.fsdecode(os.fspath(source))
    if isinstance(source, str) and text[:5].lower() == "file:":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URI names a remote host {parts.netloc!r}: {desc}")
        text = unquote(parts.path)
    if policy.media_root is not None:
        root = os.path.realpath(policy.media_root)
        real = os.path.realpath(os.path.join(root, text))  # join keeps `text` when it is absolute
        if os.path.commonpath([root, real]) != root:
            raise MediaError(f"path is outside media_root {policy.media_root!r}: {desc}")
    else:
        real = os.path.realpath(text)
    if not os.path.isfile(real):
        raise MediaError(f"file not found: {desc}")
    return real


def is_tensor(obj) -> bool:
    """Whether ``obj`` is a torch tensor (without importing torch when nothing has)."""
    torch = sys.modules.get("torch")  # no torch import just to ask the question
    return torch is not None and isinstance(obj, torch.Tensor)


def _read_file(path: str, policy: MediaPolicy, desc: str) -> Image.Image:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > policy.max_bytes:
            raise MediaError(f"image file is too large: over max_bytes={policy.max_bytes}: {desc}")
        return _decode(f.read(policy.max_bytes + 1), policy, desc)


def _path_or_base64(text: str, policy: MediaPolicy, desc: str) -> Image.Image:
    """A string with no scheme: a local file if it names one (transformers' order), else base64 image bytes.

    Whether it is a file is asked only where `policy` lets it be read, so a refused or confined path never
    tells the caller whether something exists.
    """
    path_error = None
    if len(text) <= _LONGEST_PATH:  # anything longer is no file name; spare the thousands of lstat calls
        try:
            path = resolve_local_path(text, policy)
        except MediaError as e:
            path_error = str(e).removesuffix(f": {desc}")
        else:
            return _read_file(path, policy, desc)
    if not _BASE64_TEXT.fullmatch(text.strip()):
        raise MediaError(f"{path_error or 'too long to be a file path'}; an image is {_SOURCES_ACCEPTED}: {desc}")
    reason = f"{path_error}, and not base64 image data either" if path_error else "not base64 image data"
    try:
        data = _base64_bytes(text, policy, desc, "base64 image")
    except MediaError as e:
        if e.__cause__ is None:
            raise  # over max_bytes: that is the problem to report
        raise MediaError(f"{reason} (invalid base64); an image is {_SOURCES_ACCEPTED}: {desc}") from None
    try:
        return _decode(data, policy, desc)
    except MediaError as e:
        if not isinstance(e.__cause__, UnidentifiedImageError):
            raise  # base64 of an image, but over a limit or corrupt: that is the problem to report
        raise MediaError(f"{reason} (its bytes are not an image); an image is {_SOURCES_ACCEPTED}: {desc}") from None


def _decode(data: bytes, policy: MediaPolicy, desc: str) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise MediaError(f"image is too large: over max_bytes={policy.max_bytes}: {desc}")
    Image.init()  # registers every plugin once, so the allowlist below can be checked against them
    formats = [f for f in _SAFE_FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides
            image = Image.open(io.BytesIO(data), formats=formats)
        width, height = image.size  # from the header: nothing is decoded yet
        if width * height > policy.max_pixels:
            raise TooManyPixels(f"image has too many pixels: {width}x{height} > max_pixels={policy.max_pixels}: {desc}")
        image.load()  # decode everything now so truncation surfaces here
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        # Pillow refuses pictures of over twice its own cap before reading their size out to us
        raise TooManyPixels(f"image has too many pixels: over max_pixels={policy.max_pixels} ({e}): {desc}") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"not an image (or an unsupported format): {desc}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"corrupt or truncated image ({e}): {desc}") from e


def data_uri_payload(uri: str, policy: MediaPolicy, desc: str, kind: str = "image",
                     media_types: tuple[str, ...] = ("image/",), hint: str = "") -> tuple[str, bytes]:
    """A base64 ``data:`` URI's media type (lower-cased, "" when it names none) and decoded bytes. A media
    type that starts with none of `media_types` is refused before anything is decoded (`hint` says what to
    send instead), as are payloads over ``policy.max_bytes``; `kind` names what was expected in errors."""
    header, comma, payload = uri.partition(",")
    params = header[5:].lower().split(";")
    if not comma or "base64" not in params[1:]:
        raise MediaError(f"data URI must be base64 encoded (data:{kind}/...;base64,...): {desc}")
    media_type = params[0].strip()
    if media_type and not media_type.startswith(media_types):
        raise MediaError(f"data URI is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} (media type "
                         f"{media_type!r}){hint}: {desc}")
    return media_type, _base64_bytes(unquote(payload), policy, desc, "data URI")


def _base64_bytes(payload: str, policy: MediaPolicy, desc: str, what: str) -> bytes:
    if len(payload) * 3 // 4 > policy.max_bytes + 3:  # refuse before decoding anything
        raise MediaError(f"{what} is too large: over max_bytes={policy.max_bytes}: {desc}")
    # Tolerate what clients really send: line breaks, URL-safe alphabet, no padding.
    payload = re.sub(r"\s+", "", payload).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except ValueError as e:  # binascii.Error, or a non-ASCII character (a ValueError of its own)
        raise MediaError(f"{what} holds invalid base64 ({e}): {desc}") from e


def _array_to_image(source, desc: str) -> Image.Image:
    if is_tensor(source):
        source = source.detach().cpu()
        source = (source.float() if source.is_floating_point() else source).numpy()  # numpy has no bfloat16
    array = np.asarray(source)
    scaled_from_float = False
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif not (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        raise MediaError(f"array of shape {array.shape} is not an image (HxW, HxWxC or CxHxW, C in 1/3/4): {desc}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if np.all((array >= 0) & (array <= 1)):  # (False for NaN)
            # scaled and truncated to uint8 as transformers' to_pil_image does (float64 product, float32, truncate)
            array = (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
            scaled_from_float = True
        elif np.all((array >= 0) & (array <= 255) & (array == np.round(array))):
            array = array.astype(np.uint8)  # whole numbers in [0, 255] (np.asarray(image, np.float32)): as uint8
        else:
            raise MediaError(f"float image values must lie in [0, 1], or be whole numbers in [0, 255]; got "
                             f"[{array.min()}, {array.max()}]: {desc}")
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise MediaError(f"integer image values must lie in [0, 255]; scale to uint8 first: {desc}")
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise MediaError(f"unsupported image array dtype {array.dtype}: {desc}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:  # blend onto white with transformers' numpy formula
        alpha = array[..., 3:4] / 255.0
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array))
    if scaled_from_float:
        image.info[FROM_FLOAT] = True  # image processors read these values as already rescaled (see io/pixels.py)
    return image


