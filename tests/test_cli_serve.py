"""vlmkit serve tells the user on stderr that the model is loading, then where it is ready."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import free_port  # noqa: E402


def test_serve_says_it_is_loading_then_ready_on_its_address():
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "VLMKIT_MODEL"}  # the built-in model
    process = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "ready on" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert lines and lines[0].startswith("vlmkit serve: loading model ")
    assert f"vlmkit serve: ready on http://127.0.0.1:{port}" in lines, "\n".join(lines)
    assert not any("GET /health" in line for line in lines)  # the readiness probe stays out of the access log
    assert process.returncode == 0
