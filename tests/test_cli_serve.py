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


def _serve(*flags) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "VLMKIT_MODEL"}
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", "serve", *flags], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_host_this_machine_does_not_have_is_one_clear_error_before_loading():
    for host in ("256.1.1.1", "192.0.2.1"):  # not an address; TEST-NET-1, assigned to no machine
        result = _serve("--host", host, "--port", str(free_port()))
        assert result.returncode == 1, result.stderr
        assert f"vlmkit: error: cannot listen on --host '{host}'" in result.stderr
        assert "loading model" not in result.stderr and "terminate called" not in result.stderr


def test_a_port_in_use_is_one_clear_error_naming_port_before_loading():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--port", str(port))
    assert result.returncode == 1
    assert f"vlmkit: error: --port {port} is already in use on 127.0.0.1" in result.stderr
    assert "loading model" not in result.stderr
