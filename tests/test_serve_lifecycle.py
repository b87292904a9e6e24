"""The server's life: /health is 503 until the model is loaded, a model that fails to load ends the
process with status 1, and SIGTERM stops accepting, lets in-flight answers finish, then exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_support import RunningServer, engine_for, free_port, user

from vlmkit.engine import Engine
from vlmkit.serve.app import run_server
from vlmkit.serve.config import ServeConfig


def test_health_is_503_while_the_model_loads_and_requests_are_told_to_wait(janus_dir, monkeypatch):
    loaded = engine_for(janus_dir)
    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(30)
        return loaded

    monkeypatch.setattr(Engine, "load", slow_load)
    with RunningServer(ServeConfig(model=str(janus_dir)), engine=None) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("Hi")})
        assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        answer = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("Hi"), "max_tokens": 2})
        assert answer.status_code == 200


def _serve_process(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_until_healthy(process, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def test_a_model_that_fails_to_load_ends_the_server_with_status_1(tmp_path, caplog):
    config = ServeConfig(model=str(tmp_path / "missing"), port=free_port())
    assert run_server(config) == 1
    assert "could not load the model" in caplog.text


def test_sigterm_finishes_in_flight_answers_refuses_new_ones_and_exits_0(janus_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve_process("--model", str(janus_dir), "--port", str(port), env={"VLMKIT_API_KEY": "k"})
    try:
        _wait_until_healthy(process, url)
        # long enough to be in flight when uvicorn notices the signal (it looks every 0.1 s)
        body = {"messages": user("Tell me everything."), "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=60) as response:
            lines = response.iter_lines()
            first = next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(url + "/health", timeout=5)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
    assert finish[-1] in ("stop", "length") and len(finish) > 1  # the answer ran to its end


def test_answers_longer_than_the_shutdown_timeout_end_with_an_error_event_not_a_cut(janus_dir):
    """Past --shutdown-timeout uvicorn cancels what still runs; just before, vlmkit ends those requests
    itself, so a stream closes with an error event and [DONE] (it was cut mid-body, a traceback logged)."""
    from vlmkit.builtin import builtin_model_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve_process("--model", builtin_model_path(), "--port", str(port), "--shutdown-timeout", "1")
    try:
        _wait_until_healthy(process, url)
        body = {"messages": user("Tell me everything."), "max_tokens": 1000, "ignore_eos": True, "n": 8,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert rest[-1] == "data: [DONE]"
    assert "shut down" in json.loads(rest[-2][6:])["error"]["message"]
    assert "Traceback" not in process.stderr.read()
