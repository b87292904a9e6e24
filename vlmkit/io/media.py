"""Images from anywhere a request may name them, loaded safely.

This module owns turning an image source (PIL image, numpy array, torch tensor, local path, ``file://``,
``data:`` URI or ``http(s)://`` URL) into an RGB ``PIL.Image``, and the :class:`MediaPolicy` limits that
apply on the way: file confinement, byte and pixel caps, timeouts, redirects and refusal of private
network addresses (SSRF). ``video.py`` reuses its path and URL helpers so videos obey the same policy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.errors import MediaError

_MiB = 1024 * 1024
# Decoders we let Pillow use on untrusted bytes; EPS and friends can shell out to Ghostscript.
_SAFE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "AVIF", "HEIF")
_REDIRECTS = (301, 302, 303, 307, 308)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # 2+ chars, so "C:\x.png" stays a path
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaPolicy:
    """Limits applied while loading media. The defaults suit a trusted local user; see `server_default`.

    timeout_s is the wall-clock budget of a whole fetch: connect, every redirect hop and the body.
    """

    timeout_s: float = 10.0
    max_bytes: int = 20 * _MiB
    max_pixels: int = 64 * 1024 * 1024
    max_redirects: int = 3
    allow_local_files: bool = True
    media_root: str | None = None
    allow_private_hosts: bool = True
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def server_default(cls) -> MediaPolicy:
        """The policy for a network server: no local files, no private/loopback/link-local/reserved hosts."""
        return cls(allow_local_files=False, allow_private_hosts=False)


def _describe(source) -> str:
    text = os.fsdecode(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    return text if len(text) <= 100 else text[:97] + "..."  # data URIs can be megabytes long


def _scheme(source: str) -> str | None:
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def load_image(source, policy: MediaPolicy | None = None) -> Image.Image:
    """Load `source` as an RGB ``PIL.Image``.

    Accepts a PIL image, a numpy array or torch tensor (HxW, HxWxC or CxHxW, C in 1/3/4; uint8, or float
    in [0, 1]; channels-first wins ties, as in transformers), encoded image bytes, a local path (str or
    PathLike), a ``file://`` URI, a base64 ``data:image/...`` URI or an ``http(s)://`` URL. EXIF orientation
    is applied, as ``transformers.image_utils.load_image`` does; colours are converted by `to_rgb`.
    Raises `MediaError` for anything missing, malformed, refused by `policy` or over its limits.
    """
    policy = policy or MediaPolicy()
    desc = _describe(source)
    if isinstance(source, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(source))
        except (OSError, SyntaxError, ValueError) as e:  # a lazily opened image can still fail to decode
            raise MediaError(f"corrupt or truncated image ({e}): {desc}") from e
    if isinstance(source, np.ndarray) or _is_tensor(source):
        return _array_to_image(source, desc)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), policy, desc)
    if isinstance(source, str):
        scheme = _scheme(source)
        if scheme in ("http", "https"):
            buf = io.BytesIO()
            fetch_url(source, buf, policy)
            return _decode(buf.getvalue(), policy, desc)
        if scheme == "data":
            return _decode(_data_uri_bytes(source, policy, desc), policy, desc)
        if scheme not in (None, "file"):
            raise MediaError(f"unsupported URL scheme {scheme!r} (use http, https, file or data): {desc}")
    elif not isinstance(source, os.PathLike):
        raise MediaError(f"unsupported image source type {type(source).__name__}: {desc}")
    path = resolve_local_path(source, policy)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > policy.max_bytes:
            raise MediaError(f"image file is too large: over max_bytes={policy.max_bytes}: {desc}")
        return _decode(f.read(policy.max_bytes + 1), policy, desc)


def load_images(sources, policy: MediaPolicy | None = None) -> list[Image.Image]:
    """Load each of `sources` with `load_image` under the same policy."""
    return [load_image(source, policy) for source in sources]


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
    desc = _describe(source)
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


def check_address(address: str, policy: MediaPolicy, host: str | None = None) -> None:
    """Raise `MediaError` if `policy` refuses connecting to the IP literal `address` (resolved from `host`).

    Unless private hosts are allowed or the host/IP/CIDR is in ``allowed_hosts``, anything not globally
    routable is refused (private, loopback, link-local, multicast, reserved, unspecified, CGNAT), also when
    embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64).
    """
    if policy.allow_private_hosts:
        return
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 scope id
    if _is_allowed(ip, host, policy.allowed_hosts):
        return
    if _is_internal(ip):
        name = f"host {host!r} resolves to " if host and host != address else ""
        raise MediaError(f"refused private or internal address: {name}{ip}")


def fetch_url(url: str, out: BinaryIO, policy: MediaPolicy | None = None) -> int:
    """Download an http(s) `url` into the binary file `out` under `policy`; return the bytes written.

    Redirects are followed here so every hop's scheme and resolved addresses are checked. Against DNS
    rebinding, the socket connects to the very IPs that were checked (TLS still verifies the host name).
    Environment proxies are not used. The stdlib gives DNS lookups themselves no timeout.
    """
    policy = policy or MediaPolicy()
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for hop in range(policy.max_redirects + 1):
        try:
            parts, host, port, ips = _checked_target(current, policy)
        except MediaError as e:
            if hop == 0:
                raise
            raise MediaError(f"redirect to a refused target {_describe(current)} ({e}) from {_describe(url)}") from e
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        pinned = _PinnedHTTPS if parts.scheme.lower() == "https" else _PinnedHTTP
        conn = pinned(host, port, ips, _remaining(deadline, policy, url))
        try:
            conn.request("GET", path, headers={"User-Agent": "vlmkit", "Accept-Encoding": "identity"})
            sock = conn.sock  # held here: http.client drops conn.sock when the server will close
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise MediaError(f"HTTP {resp.status} redirect without a Location header: {_describe(url)}")
                current = urljoin(current, location)
                continue
            if resp.status != 200:
                raise MediaError(f"HTTP error {resp.status} {resp.reason} fetching {_describe(current)}")
            return _read_capped(resp, sock, out, policy, deadline, current)
        except TimeoutError as e:  # socket.timeout is TimeoutError since 3.10
            raise MediaError(f"timed out after {policy.timeout_s}s fetching {_describe(current)}") from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise MediaError(f"could not fetch {_describe(current)}: {e}") from e
        finally:
            conn.close()
    raise MediaError(f"too many redirects (more than {policy.max_redirects}) fetching {_describe(url)}")


def _is_tensor(obj) -> bool:
    torch = sys.modules.get("torch")  # no torch import just to ask the question
    return torch is not None and isinstance(obj, torch.Tensor)


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
            raise MediaError(f"image has too many pixels: {width}x{height} > max_pixels={policy.max_pixels}: {desc}")
        image.load()  # decode everything now so truncation surfaces here
        return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as e:
        raise MediaError(f"image has too many pixels ({e}): {desc}") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"not an image (or an unsupported format): {desc}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"corrupt or truncated image ({e}): {desc}") from e


def _data_uri_bytes(uri: str, policy: MediaPolicy, desc: str) -> bytes:
    header, comma, payload = uri.partition(",")
    params = header[5:].lower().split(";")
    if not comma or "base64" not in params[1:]:
        raise MediaError(f"data URI must be base64 encoded (data:image/...;base64,...): {desc}")
    if params[0] and not params[0].startswith("image/"):
        raise MediaError(f"data URI is not an image (media type {params[0]!r}): {desc}")
    if len(payload) * 3 // 4 > policy.max_bytes + 3:  # refuse before decoding anything
        raise MediaError(f"data URI is too large: over max_bytes={policy.max_bytes}: {desc}")
    # Tolerate what clients really send: line breaks, percent-encoding, URL-safe alphabet, no padding.
    payload = re.sub(r"\s+", "", unquote(payload)).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except binascii.Error as e:
        raise MediaError(f"data URI holds invalid base64 ({e}): {desc}") from e


def _array_to_image(source, desc: str) -> Image.Image:
    if _is_tensor(source):
        source = source.detach().cpu()
        source = (source.float() if source.is_floating_point() else source).numpy()  # numpy has no bfloat16
    array = np.asarray(source)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif not (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        raise MediaError(f"array of shape {array.shape} is not an image (HxW, HxWxC or CxHxW, C in 1/3/4): {desc}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all((array >= 0) & (array <= 1)):  # also rejects NaN
            raise MediaError(f"float image values must lie in [0, 1], got [{array.min()}, {array.max()}]: {desc}")
        array = np.rint(array * 255).astype(np.uint8)
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
    return Image.fromarray(np.ascontiguousarray(array))


def _is_allowed(ip, host: str | None, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # not an IP or CIDR: a host name
            if host and entry.lower().rstrip(".") == host.lower().rstrip("."):
                return True
    return False


def _is_internal(ip) -> bool:
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _is_internal(embedded):
            return True
    return not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def _checked_target(url: str, policy: MediaPolicy):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme {scheme!r} (only http and https are fetched): {_describe(url)}")
    host = parts.hostname
    if not host:
        raise MediaError(f"URL has no host: {_describe(url)}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as e:
        raise MediaError(f"cannot resolve {_describe(url)}: {e}") from e
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in ips:  # refuse if any answer is internal: a mixed answer is a rebinding tell
        check_address(ip, policy, host)
    return parts, host, port, ips


def _remaining(deadline: float, policy: MediaPolicy, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"timed out after {policy.timeout_s}s fetching {_describe(url)}")
    return left


def _read_capped(resp, sock: socket.socket, out: BinaryIO, policy: MediaPolicy, deadline: float, url: str) -> int:
    length = (resp.getheader("Content-Length") or "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise MediaError(f"response too large: Content-Length {length} > max_bytes={policy.max_bytes}: {_describe(url)}")
    total = 0
    while True:
        sock.settimeout(_remaining(deadline, policy, url))  # a slow drip cannot outlast the budget
        chunk = resp.read1(64 * 1024)
        if not chunk:
            return total
        total += len(chunk)
        if total > policy.max_bytes:
            raise MediaError(f"response too large: over max_bytes={policy.max_bytes}: {_describe(url)}")
        out.write(chunk)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the already-checked IPs, trying each in turn: the host name is never resolved again."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ips = ips

    def connect(self):
        for i, ip in enumerate(self._ips):
            try:
                self.sock = socket.create_connection((ip, self.port), self.timeout)
                return
            except OSError:
                if i == len(self._ips) - 1:
                    raise


class _PinnedHTTPS(_PinnedHTTP, http.client.HTTPSConnection):
    """As _PinnedHTTP, over TLS: SNI and the certificate check use the host name, not the IP dialled."""

    def connect(self):
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
