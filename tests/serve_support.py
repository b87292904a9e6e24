"""Helpers for the server tests: a real uvicorn server on loopback in a thread (sharing one loaded
model between server configurations), free ports, inline images, and a tiny local HTTP server that
serves images and redirects (for the media-policy tests)."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import httpx
import numpy as np
from PIL import Image

from vlmkit.engine import Engine
from vlmkit.serve.app import create_app
from vlmkit.serve.config import ServeConfig, ServeLimits
from vlmkit.serve.http import uvicorn_config
from vlmkit.serve.requests import RequestHandler

_ENGINES: dict[str, Engine] = {}


def engine_for(model_dir) -> Engine:
    """One loaded Engine per checkpoint for the whole test session."""
    key = str(model_dir)
    if key not in _ENGINES:
        _ENGINES[key] = Engine.load(key)
    return _ENGINES[key]


def stats_when(server, ready, timeout: float = 10.0) -> dict:
    """The server's /stats once ``ready(stats)`` holds (or as they are after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if ready(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A uvicorn server in a thread; ``url`` is its base address, ``app`` the FastAPI app."""

    def __init__(self, config: ServeConfig, engine: Engine | None):
        import uvicorn

        self.config = replace(config, port=free_port())
        self.app = create_app(self.config, engine)
        self.server = uvicorn.Server(uvicorn_config(self.app, replace(self.config, shutdown_timeout_s=5),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", headers=self.headers).json()

    def openai(self, **options):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=self.config.api_key or "unused", max_retries=0, **options)

    def chat(self, messages, **options):
        """``chat.completions.create`` through the openai client; greedy unless a temperature is given."""
        if not hasattr(self, "_client"):
            self._client = self.openai()
        options.setdefault("temperature", 0)
        return self._client.chat.completions.create(model=self.config.model_name, messages=messages, **options)


def served_text(engine: Engine, text: str) -> str:
    """``Engine.chat``'s answer as the server sends it: without the space the chat template leaves the
    model to write before its answer (Janus)."""
    return text.removeprefix(RequestHandler(engine, ServeConfig(model="m")).answer_prefix)


def serve(model_dir, **settings) -> RunningServer:
    """A server on the checkpoint at ``model_dir``; ``settings`` are ServeConfig fields, ``limits`` a dict."""
    limits = ServeLimits(**settings.pop("limits", {}))
    config = ServeConfig(model=str(model_dir), limits=limits, **settings)
    return RunningServer(config, engine_for(model_dir))


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(width: int = 24, height: int = 20, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    """A one-message conversation; strings become text parts."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def engine_messages(messages: list[dict]) -> list[dict]:
    """The same conversation as Engine.chat takes it (images as the URL strings)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image", "url": p["image_url"]["url"]} if p["type"] == "image_url" else p
                       for p in content]
        out.append({"role": message["role"], "content": content})
    return out


@contextmanager
def local_image_host():
    """An HTTP server on 127.0.0.1 serving ``/image.png`` and ``/redirect?to=URL`` (302); yields its port."""

    image = png_bytes(16, 16, seed=7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
