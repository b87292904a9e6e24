"""vlmkit.io.media: every image source kind, every colour mode, every policy limit and every error.

Network tests use a local ThreadingHTTPServer on 127.0.0.1; an autouse guard fails any test whose code
tries to connect anywhere else or to resolve a real host name, so nothing leaves the machine.
"""

import base64
import dataclasses
import hashlib
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import MediaError
from vlmkit.io.media import MediaPolicy, check_address, image_content_hash, load_image, load_images, to_rgb

SERVER = MediaPolicy.server_default()
LOCAL_ONLY = dataclasses.replace(SERVER, allowed_hosts=("127.0.0.1",))  # server rules, but our test server allowed
CAP = 50_000  # max_bytes used against the big endpoints


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


RED = Image.new("RGB", (8, 6), (255, 0, 0))
RED_PNG = png_bytes(RED)


# ----------------------------------------------------------------------------------------- fixtures


def is_ip_literal(host: str) -> bool:
    """True for addresses getaddrinfo parses without DNS, legacy IPv4 forms like "2130706433" included."""
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        try:
            socket.inet_aton(host)
            return True
        except OSError:
            return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail loudly if code under test connects to, or looks up, anything but 127.0.0.1."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"test tried to connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not is_ip_literal(host):
            raise AssertionError(f"test tried a DNS lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class Handler(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep test output clean
        pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location):
        self.send(302, headers=[("Location", location), ("Content-Length", "0")])

    def do_GET(self):
        Handler.requests.append((self.path, self.headers.get("Host")))
        port = self.server.server_address[1]
        path = self.path
        try:
            if path == "/img.png":
                self.send(200, RED_PNG, [("Content-Type", "image/png"), ("Content-Length", str(len(RED_PNG)))])
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])
                self.redirect(f"/redirect/{n - 1}" if n > 1 else f"http://127.0.0.1:{port}/img.png")
            elif path == "/relative":
                self.redirect("img.png")
            elif path == "/to-file":
                self.redirect("file:///etc/passwd")
            elif path == "/to-ipv6-loopback":
                self.redirect(f"http://[::1]:{port}/img.png")
            elif path == "/to-metadata":
                self.redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/to-private":
                self.redirect("http://10.0.0.1/img.png")
            elif path == "/slow":
                time.sleep(1.0)
                self.send(200, RED_PNG)
            elif path == "/drip":  # each byte arrives well inside the socket timeout, the whole never does
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/drip-headers":  # a header line well inside the socket timeout, the end never
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(40):
                    self.wfile.write(b"X-Slow: 1\r\n")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/drip-status":  # the status line itself, a byte at a time
                for byte in b"HTTP/1.1 200 OK\r\n" * 3:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/big-with-length":
                self.send(200, b"x" * 100, [("Content-Length", str(CAP + 1))])
            elif path == "/big-no-length":  # HTTP/1.0, body ends at close: only the running count can stop it
                self.send_response(200)
                self.end_headers()
                for _ in range(4):
                    self.wfile.write(b"x" * CAP)
            elif path == "/not-image":
                self.send(200, b"<html>hello</html>", [("Content-Type", "text/html")])
            else:
                self.send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading on purpose
            pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def error_of(source, policy=None) -> str:
    with pytest.raises(MediaError) as info:
        load_image(source, policy)
    return str(info.value)


def pixels(image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ------------------------------------------------------------------------------------- source kinds


def test_pil_image_is_returned_as_an_rgb_copy():
    out = load_image(RED)
    assert out is not RED and out.size == (8, 6) and pixels(out)[0, 0].tolist() == [255, 0, 0]


def test_encoded_bytes_decode(tmp_path):
    assert pixels(load_image(RED_PNG))[0, 0].tolist() == [255, 0, 0]


def test_local_path_as_str_pathlike_and_file_uris(tmp_path):
    path = tmp_path / "red image.png"
    path.write_bytes(RED_PNG)
    for source in (str(path), path, path.as_uri(), "file://localhost" + path.as_uri()[7:]):
        assert pixels(load_image(source))[0, 0].tolist() == [255, 0, 0], source


def test_file_uri_with_a_remote_host_is_refused():
    assert "remote host" in error_of("file://fileserver/share/a.png")


def test_data_uri_decodes_with_line_breaks_and_urlsafe_alphabet():
    b64 = base64.b64encode(RED_PNG).decode()
    assert load_image(f"data:image/png;base64,{b64}").size == (8, 6)
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert load_image(f"data:image/png;base64,{wrapped}").size == (8, 6)
    urlsafe = base64.urlsafe_b64encode(RED_PNG).decode().rstrip("=")
    assert load_image(f"data:image/png;base64,{urlsafe}").size == (8, 6)


def test_data_uri_errors_name_the_problem_and_truncate_the_source():
    message = error_of("data:image/png;base64," + "!" * 5000)
    assert "invalid base64" in message and len(message) < 300
    assert "data:image/png;base64,... (5022 characters)" in message and "!!" not in message  # header and length
    assert "must be base64" in error_of("data:image/png,rawbytes")
    assert "not an image" in error_of("data:text/html;base64,PGh0bWw+")
    assert "invalid base64" in error_of("data:image/png;base64,iVBOR\u00e9w0K")  # non-ASCII: not a bare ValueError
    big = "data:image/png;base64," + "A" * 4000
    assert "too large" in error_of(big, MediaPolicy(max_bytes=1000))


def test_raw_base64_strings_decode_like_transformers_load_image():
    image_utils = pytest.importorskip("transformers.image_utils")
    noisy = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    for data in (png_bytes(noisy), png_bytes(noisy, "JPEG")):  # JPEG's base64 starts "/9j/", like a path
        b64 = base64.b64encode(data).decode()
        expected = np.asarray(image_utils.load_image(b64))
        np.testing.assert_array_equal(pixels(load_image(b64)), expected)
        wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60)) + "\n"
        np.testing.assert_array_equal(pixels(load_image(wrapped)), expected)
        # no file is read, so the server's policy and a media_root take it too
        np.testing.assert_array_equal(pixels(load_image(b64, SERVER)), expected)
        np.testing.assert_array_equal(pixels(load_image(b64, MediaPolicy(media_root="/nonexistent"))), expected)


def test_a_string_is_a_path_before_it_is_base64(tmp_path, monkeypatch):
    (tmp_path / "QUJD").write_bytes(RED_PNG)  # "QUJD" is also valid base64 (b"ABC")
    monkeypatch.chdir(tmp_path)
    assert pixels(load_image("QUJD"))[0, 0].tolist() == [255, 0, 0]
    assert "local files are refused" in error_of("QUJD", SERVER)


def test_raw_base64_obeys_the_byte_and_pixel_caps_and_reports_corruption():
    assert "too large" in error_of(base64.b64encode(RED_PNG).decode(), MediaPolicy(max_bytes=10))
    noisy = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert "truncated" in error_of(base64.b64encode(noisy[: len(noisy) // 2]).decode())
    message = error_of(base64.b64encode(png_claiming(10_000, 10_000)).decode(), MediaPolicy(max_pixels=1_000_000))
    assert "too many pixels" in message


def test_a_string_neither_file_nor_base64_image_names_the_accepted_sources():
    for source in ("cat.png", "photos/cat", base64.b64encode(b"not an image" * 200_000).decode(), "A=" * 1_000_000):
        message = error_of(source)
        assert "base64" in message and "http(s)://" in message and len(message) < 400, message[:500]
    assert "file not found" in error_of("photos/cat")
    assert "not base64 image data (its bytes are not an image)" in error_of(base64.b64encode(b"x" * 9000).decode())
    server_message = error_of("/etc/passwd", SERVER)
    assert "local files are refused" in server_message and "not base64 image data" in server_message


def test_linear_time_refusal_of_long_whitespace_strings():
    start = time.perf_counter()
    assert "too long to be a file path" in error_of(" " * 2_000_000 + "!")
    assert time.perf_counter() - start < 2


def test_numpy_layouts_and_dtypes():
    gray = np.full((6, 8), 100, np.uint8)
    assert pixels(load_image(gray))[0, 0].tolist() == [100] * 3
    assert pixels(load_image(gray[..., None]))[0, 0].tolist() == [100] * 3
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 1] = 200
    assert pixels(load_image(rgb))[0, 0].tolist() == [0, 200, 0]
    assert load_image(np.moveaxis(rgb, -1, 0)).size == (8, 6)  # channels-first 3xHxW
    assert pixels(load_image(rgb.astype(np.float32) / 255))[0, 0].tolist() == [0, 200, 0]
    assert pixels(load_image(rgb.astype(np.int64)))[0, 0].tolist() == [0, 200, 0]
    assert pixels(load_image(np.ones((6, 8), bool)))[0, 0].tolist() == [255] * 3


def test_numpy_rgba_is_composited_onto_white():
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128
    out = pixels(load_image(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 0, 0]
    assert out[0, 2].tolist() == [round(128 / 255 * 200 + 127 / 255 * 255), 127, 127]


def test_torch_tensors_chw_float_and_hwc_uint8():
    chw = torch.zeros(3, 6, 8)
    chw[2] = 1.0
    assert load_image(chw).size == (8, 6) and pixels(load_image(chw))[0, 0].tolist() == [0, 0, 255]
    assert pixels(load_image(chw.to(torch.bfloat16)))[0, 0].tolist() == [0, 0, 255]
    hwc = torch.full((6, 8, 3), 7, dtype=torch.uint8)
    assert pixels(load_image(hwc))[0, 0].tolist() == [7, 7, 7]


def test_bad_arrays_are_refused_with_the_reason():
    assert "[0, 1]" in error_of(np.full((6, 8, 3), 2.5, np.float32))
    assert "[0, 1]" in error_of(np.full((6, 8, 3), 256.0, np.float32))
    assert "[0, 1]" in error_of(np.full((6, 8, 3), np.nan, np.float32))
    assert "[0, 255]" in error_of(np.full((6, 8), 1000, np.uint16))
    assert "not an image" in error_of(np.zeros((2, 6, 8, 3), np.uint8))
    assert "not an image" in error_of(np.zeros((6, 8, 2), np.uint8))


def test_unsupported_source_types_and_schemes():
    assert "unsupported image source type int" in error_of(123)
    for url in ("ftp://example.com/a.png", "gopher://example.com/a", "javascript:alert(1)", "mailto:a@b.c"):
        assert "unsupported URL scheme" in error_of(url), url


def test_load_images_loads_each_source(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(RED_PNG)
    out = load_images([path, RED, RED_PNG])
    assert [image.size for image in out] == [(8, 6)] * 3


def test_image_processors_flatten_per_sample_image_lists_like_transformers():
    """A list of per-sample lists ([[a], [b, c]]) is what transformers' make_flat_list_of_images flattens."""
    transformers = pytest.importorskip("transformers")
    from vlmkit.models.idefics.image_processing import IdeficsImageProcessor
    from vlmkit.models.janus.image_processing import JanusImageProcessor

    rng = np.random.default_rng(0)
    a, b, c = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((23, 37), (30, 20), (9, 9)))
    nested, flat = [[a], [b, c]], [a, b, c]
    janus, janus_ref = JanusImageProcessor(size=32), transformers.JanusImageProcessorPil(size={"height": 32, "width": 32})
    for images in (nested, [[a], [], [b, c]], (a, b, c)):
        expected = janus_ref(images, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(janus(images)["pixel_values"], expected, rtol=0, atol=1e-6)
    assert janus(nested)["pixel_values"].shape == janus(flat)["pixel_values"].shape == (3, 3, 32, 32)
    idefics, idefics_ref = IdeficsImageProcessor(image_size=24), transformers.IdeficsImageProcessorPil(image_size=24)
    torch.testing.assert_close(idefics(nested, return_tensors="pt"), idefics_ref(nested, return_tensors="pt"),
                               rtol=0, atol=1e-6)
    sizes = idefics(nested, transform=lambda image: torch.tensor(image.size), return_tensors="pt")  # the training path flattens too
    assert sizes.tolist() == [list(a.size), list(b.size), list(c.size)]


# ----------------------------------------------------------------------------------- colour modes


def test_grayscale_and_bilevel_replicate_into_three_channels():
    assert pixels(load_image(Image.new("L", (4, 4), 77)))[0, 0].tolist() == [77] * 3
    assert pixels(load_image(Image.new("1", (4, 4), 1)))[0, 0].tolist() == [255] * 3


def test_rgba_and_la_are_composited_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    assert pixels(load_image(rgba))[0].tolist() == [[255, 255, 255], [10, 20, 30], [127, 127, 127]]
    la = Image.new("LA", (2, 1))
    la.putdata([(50, 0), (50, 255)])
    assert pixels(load_image(la))[0].tolist() == [[255] * 3, [50] * 3]


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putdata([0, 1])
    assert pixels(load_image(palette))[0].tolist() == [[0, 0, 0], [10, 200, 30]]
    reread = Image.open(io.BytesIO(png_bytes(palette, transparency=0)))  # tRNS: index 0 is transparent
    assert reread.mode == "P" and reread.info.get("transparency") is not None
    assert pixels(load_image(reread))[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_cmyk_uses_pillow_conversion():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 0, 0))
    assert pixels(load_image(cmyk))[0, 0].tolist() == [255, 0, 255]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    sixteen = Image.open(io.BytesIO(png_bytes(Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)))))
    assert sixteen.mode == "I;16"
    assert pixels(load_image(sixteen))[0, :, 0].tolist() == [0, 100, 255]


def test_modes_match_transformers_convert_to_rgb():
    transforms = pytest.importorskip("transformers.image_transforms")
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8))
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = Image.open(io.BytesIO(png_bytes(palette, transparency=3)))
    for image in (rgba, rgba.convert("LA"), rgba.convert("L"), palette, transparent, rgba.convert("CMYK")):
        expected = transforms.convert_to_rgb(image, return_numpy=True)
        np.testing.assert_array_equal(pixels(load_image(image)), expected, err_msg=image.mode)


def exif_rotated_jpeg() -> bytes:
    """A 37x23 JPEG of a gradient, tagged "rotate 90 degrees clockwise to display" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    x = np.linspace(0, 255, 37)[None, :].repeat(23, 0)
    gradient = np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], axis=-1).round().astype(np.uint8)
    return png_bytes(Image.fromarray(gradient), "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    """Decoded sources (files, bytes, base64) are turned upright, as transformers' load_image does."""
    image_utils = pytest.importorskip("transformers.image_utils")
    jpeg = exif_rotated_jpeg()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg)
    expected = np.asarray(image_utils.load_image(str(path)))
    assert expected.shape == (37, 23, 3)  # upright: the tag was applied
    for source in (path, str(path), jpeg, base64.b64encode(jpeg).decode()):
        np.testing.assert_array_equal(pixels(load_image(source)), expected, err_msg=type(source).__name__)
    # upright=True does for a PIL image what transformers' load_image does to one handed to it
    np.testing.assert_array_equal(pixels(load_image(Image.open(path), upright=True)),
                                  np.asarray(image_utils.load_image(Image.open(path))))


def test_a_pil_image_keeps_its_pixels_as_transformers_processors_keep_them():
    """transformers' processors do not apply a PIL image's EXIF tag (images= and chat blocks alike)."""
    transformers = pytest.importorskip("transformers")
    from vlmkit.models.idefics.image_processing import IdeficsImageProcessor
    from vlmkit.models.janus.image_processing import JanusImageProcessor

    jpeg = exif_rotated_jpeg()
    assert load_image(Image.open(io.BytesIO(jpeg))).size == (37, 23)  # not rotated
    janus, janus_ref = JanusImageProcessor(size=32), transformers.JanusImageProcessorPil(size={"height": 32, "width": 32})
    torch.testing.assert_close(janus(Image.open(io.BytesIO(jpeg)))["pixel_values"],
                               janus_ref(Image.open(io.BytesIO(jpeg)), return_tensors="pt")["pixel_values"],
                               rtol=0, atol=1e-6)
    idefics, idefics_ref = IdeficsImageProcessor(image_size=24), transformers.IdeficsImageProcessorPil(image_size=24)
    torch.testing.assert_close(idefics(Image.open(io.BytesIO(jpeg)), return_tensors="pt"),
                               idefics_ref(Image.open(io.BytesIO(jpeg)), return_tensors="pt"), rtol=0, atol=1e-6)


def test_chat_blocks_orient_images_as_transformers_apply_chat_template_does(janus_dir, tmp_path):
    """A file in a content block is turned upright, a PIL image in one is not: transformers' chat path hands
    PIL images to the processor untouched and loads only strings through load_image."""
    transformers = pytest.importorskip("transformers")
    from vlmkit.models.janus import JanusProcessor

    jpeg = exif_rotated_jpeg()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg)
    ref = transformers.AutoProcessor.from_pretrained(str(janus_dir), backend="pil")
    ours = JanusProcessor.from_pretrained(str(janus_dir))
    for block in ({"type": "image", "path": str(path)}, {"type": "image", "image": Image.open(path)},
                  {"type": "image", "base64": base64.b64encode(jpeg).decode()}):
        chat = [{"role": "user", "content": [block, {"type": "text", "text": "What is this?"}]}]
        kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        expected = ref.apply_chat_template(chat, **kwargs)["pixel_values"]
        torch.testing.assert_close(ours.apply_chat_template(chat, **kwargs)["pixel_values"], expected,
                                   rtol=0, atol=1e-6, msg=lambda m: f"{sorted(block)}: {m}")


def test_to_rgb_is_exposed_for_callers_holding_pil_images():
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


# ------------------------------------------------------------------------------------ decode errors


def test_missing_file_names_the_path(tmp_path):
    message = error_of(tmp_path / "nope.png")
    assert "file not found" in message and "nope.png" in message


def test_non_image_bytes_and_eps_are_not_images(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just words")
    assert "not an image" in error_of(text)
    # Pillow could open EPS through Ghostscript; untrusted bytes never get that far.
    assert "not an image" in error_of(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_truncated_file_is_caught_by_a_full_decode():
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = png_bytes(noisy)
    assert "truncated" in error_of(data[: len(data) // 2])
    jpeg = png_bytes(noisy, "JPEG")
    assert "truncated" in error_of(jpeg[: len(jpeg) // 2])


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_from_the_header_before_decoding():
    message = error_of(png_claiming(10_000, 10_000), MediaPolicy(max_pixels=1_000_000))
    assert "too many pixels" in message and "10000x10000" in message
    assert "max_pixels=" in error_of(png_claiming(100_000, 100_000))  # past Pillow's own bomb limit too


def test_too_many_bytes_for_local_files_and_bytes(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(RED_PNG)
    assert "too large" in error_of(path, MediaPolicy(max_bytes=10))
    assert "too large" in error_of(RED_PNG, MediaPolicy(max_bytes=10))


# ----------------------------------------------------------------------------- local-file policies


def test_server_policy_refuses_local_files(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(RED_PNG)
    for source in (path, str(path), path.as_uri()):
        assert "local files are refused" in error_of(source, SERVER)


def test_media_root_confines_paths_dotdot_and_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(RED_PNG)
    (tmp_path / "secret.png").write_bytes(RED_PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "alias.png").symlink_to(root / "sub" / "in.png")
    policy = MediaPolicy(media_root=str(root))

    assert load_image("sub/in.png", policy).size == (8, 6)  # relative to the root
    assert load_image(root / "sub" / "in.png", policy).size == (8, 6)
    assert load_image(root / "alias.png", policy).size == (8, 6)  # a symlink that stays inside
    for outside in ("../secret.png", "sub/../../secret.png", tmp_path / "secret.png", root / "escape.png",
                    (tmp_path / "secret.png").as_uri(), "/etc/passwd"):
        assert "outside media_root" in error_of(outside, policy), outside


def test_media_root_hides_whether_outside_files_exist(tmp_path):
    policy = MediaPolicy(media_root=str(tmp_path / "root"))
    assert "outside media_root" in error_of(tmp_path / "no-such-file.png", policy)


# ------------------------------------------------------------------------------------------- HTTP


def test_http_image_downloads(server):
    assert pixels(load_image(f"{server}/img.png", LOCAL_ONLY))[0, 0].tolist() == [255, 0, 0]


def test_redirect_chains_are_followed_up_to_max_redirects(server):
    assert load_image(f"{server}/redirect/3", MediaPolicy(max_redirects=3)).size == (8, 6)
    assert load_image(f"{server}/relative").size == (8, 6)
    assert "too many redirects" in error_of(f"{server}/redirect/4", MediaPolicy(max_redirects=3))


def test_http_error_status_is_reported(server):
    message = error_of(f"{server}/missing.png")
    assert "HTTP error 404" in message and "missing.png" in message


def test_non_image_response_is_reported(server):
    assert "not an image" in error_of(f"{server}/not-image")


def test_slow_response_times_out(server):
    started = time.monotonic()
    assert "timed out" in error_of(f"{server}/slow", MediaPolicy(timeout_s=0.2))
    assert time.monotonic() - started < 0.9


def test_slow_drip_body_cannot_outlast_the_timeout(server):
    started = time.monotonic()
    assert "timed out" in error_of(f"{server}/drip", MediaPolicy(timeout_s=0.5))
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("route", ["/drip-headers", "/drip-status"])
def test_a_status_line_or_headers_dripped_slowly_cannot_outlast_the_timeout(server, route):
    """The budget covers the whole exchange, not each read: a server that sends its status line or headers
    a byte or a line at a time (each well inside the socket timeout) is cut off at the deadline."""
    started = time.monotonic()
    assert "timed out after 0.5s" in error_of(f"{server}{route}", MediaPolicy(timeout_s=0.5))
    assert time.monotonic() - started < 1.5


def test_too_large_responses_are_refused_with_and_without_content_length(server):
    policy = MediaPolicy(max_bytes=CAP)
    assert "Content-Length" in error_of(f"{server}/big-with-length", policy)
    assert "too large" in error_of(f"{server}/big-no-length", policy)


def test_redirect_to_a_non_http_scheme_is_refused(server):
    message = error_of(f"{server}/to-file")
    assert "redirect to a refused target" in message and "unsupported URL scheme 'file'" in message


# ------------------------------------------------------------------------------ private addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "fe80::1%eth0",
])
def test_server_policy_refuses_internal_addresses(address):
    with pytest.raises(MediaError, match="refused private or internal address"):
        check_address(address, SERVER)
    check_address(address, MediaPolicy())  # the local default allows them


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_server_policy_allows_public_addresses(address):
    check_address(address, SERVER)


def test_allowed_hosts_accepts_ips_cidrs_and_names():
    check_address("10.1.2.3", dataclasses.replace(SERVER, allowed_hosts=("10.0.0.0/8",)))
    check_address("10.1.2.3", dataclasses.replace(SERVER, allowed_hosts=("10.1.2.3",)))
    check_address("10.1.2.3", dataclasses.replace(SERVER, allowed_hosts=("Images.Internal",)), host="images.internal.")
    with pytest.raises(MediaError):
        check_address("10.1.2.3", dataclasses.replace(SERVER, allowed_hosts=("10.9.0.0/16", "other")), host="x")


def test_server_policy_refuses_loopback_urls_without_sending_a_request(server):
    port = server.rsplit(":", 1)[1]
    before = len(Handler.requests)
    for url in (f"{server}/img.png", f"http://[::1]:{port}/img.png", f"http://2130706433:{port}/img.png"):
        assert "refused private or internal address" in error_of(url, SERVER), url
    assert len(Handler.requests) == before


def test_server_policy_refuses_private_urls_before_connecting():
    # The loopback guard would fail this test on any connection attempt.
    for url in ("http://10.0.0.1/a.png", "http://169.254.169.254/latest/meta-data/", "https://[fd00::1]/a.png"):
        assert "refused private or internal address" in error_of(url, SERVER), url


@pytest.mark.parametrize("path", ["/to-ipv6-loopback", "/to-metadata", "/to-private"])
def test_redirects_to_internal_addresses_are_refused(server, path):
    message = error_of(server + path, LOCAL_ONLY)
    assert "redirect to a refused target" in message and "refused private or internal address" in message


def test_any_internal_answer_in_a_dns_reply_is_refused(monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        assert host == "rebind.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "127.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert "resolves to 127.0.0.1" in error_of("http://rebind.test/a.png", SERVER)


def test_connection_goes_to_the_checked_ip_not_a_second_lookup(server, monkeypatch):
    answers = iter(["127.0.0.1", "10.0.0.1"])  # a rebinding DNS: safe once, internal the next time
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if is_ip_literal(host):  # socket.create_connection parses the pinned IP through here
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = server.rsplit(":", 1)[1]
    policy = dataclasses.replace(SERVER, allowed_hosts=("127.0.0.1",))
    assert load_image(f"http://pinned.test:{port}/img.png", policy).size == (8, 6)
    assert Handler.requests[-1] == ("/img.png", f"pinned.test:{port}")  # Host header keeps the name


# ------------------------------------------------------------------------------------------ hashing


def test_content_hash_is_stable_and_sensitive_to_pixels_and_size():
    a = Image.new("RGB", (4, 6), (1, 2, 3))
    assert image_content_hash(a) == image_content_hash(a.copy())
    assert image_content_hash(a) == hashlib.sha256(b"RGB:4x6:" + a.tobytes()).hexdigest()
    b = a.copy()
    b.putpixel((3, 5), (1, 2, 4))
    assert image_content_hash(a) != image_content_hash(b)
    assert image_content_hash(a) != image_content_hash(Image.new("RGB", (6, 4), (1, 2, 3)))  # same bytes


def test_a_transparent_file_is_read_as_transformers_load_image_reads_it(tmp_path):
    """transformers' load_image drops the alpha band of a decoded file (its processors composite only PIL images
    handed to them); the server composites onto white, as vLLM does."""
    transformers = pytest.importorskip("transformers")
    rgba = np.random.default_rng(2).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    path = tmp_path / "half_transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    want = np.asarray(transformers.image_utils.load_image(str(path)))
    assert np.array_equal(np.asarray(load_image(str(path))), want)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), want)
    on_white = np.asarray(load_image(str(path), on_white=True))
    assert np.array_equal(on_white, np.asarray(load_image(Image.open(path))))  # as a PIL image handed over
    assert not np.array_equal(on_white, want)
