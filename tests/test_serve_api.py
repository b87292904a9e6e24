"""The HTTP surface around the endpoints: the published OpenAPI schema, routing errors that do not echo
the request, deadlines for slow clients, and answers that begin with their first word (not with the
space the chat template leaves the model to write)."""

import socket
import time

import httpx
import pytest
from serve_support import engine_for, serve, user

from vlmkit.builtin import builtin_model_path


@pytest.fixture(scope="module")
def server(janus_dir):
    with serve(janus_dir, header_timeout_s=0.5, body_timeout_s=0.5) as running:
        yield running


def test_the_openapi_schema_describes_what_the_server_accepts(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/stats"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    body = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert body["required"] == ["messages"]
    max_tokens = body["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens == {"type": "integer", "minimum": 1}
    assert {"200", "400", "413", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert httpx.get(server.url + "/docs").status_code == 404  # only with --docs


def test_health_answers_head_and_a_model_is_retrieved_by_id_as_openai_does(server):
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""
    model = server.openai().models.retrieve(server.config.model_name)
    assert model.id == server.config.model_name and model.object == "model"
    unknown = httpx.get(server.url + "/v1/models/org/no-such-model")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found" and "no-such-model" in unknown.json()["error"]["message"]
    assert "/v1/models/{model_id}" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_docs_page_is_served_with_the_flag(janus_dir):
    with serve(janus_dir, docs=True) as documented:
        assert "swagger" in httpx.get(documented.url + "/docs").text.lower()


def test_a_404_does_not_echo_the_requested_path(server):
    path = "/v1/" + "secret-token-" * 200
    response = httpx.get(server.url + path)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "secret-token" not in message and "/v1/chat/completions" in message and len(message) < 200


def test_a_405_names_the_allowed_methods_in_an_allow_header(server):
    response = httpx.get(server.url + "/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "use POST" in response.json()["error"]["message"]


def test_a_client_that_sends_its_headers_too_slowly_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.config.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        sock.sendall(b"X-Slow: 1\r\n")  # more headers keep coming, never the blank line that ends them
        assert sock.recv(1024) == b""  # closed by the server
    assert time.monotonic() - started < 2  # the 0.5 s deadline, not the client's 5 s


def test_a_body_that_arrives_too_slowly_is_a_408(server):
    with socket.create_connection(("127.0.0.1", server.config.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\"")
        reply = b""
        while b"--body-timeout" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply


def test_answers_do_not_start_with_the_templates_space_plain_or_streamed():
    path = builtin_model_path()
    engine = engine_for(path)
    messages = user("What shape is it?")
    expected = engine.chat(messages, max_new_tokens=8).text
    assert expected.startswith(" ")  # the model writes the template's separator itself
    with serve(path) as builtin:
        plain = builtin.chat(messages, max_tokens=8).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in builtin.chat(messages, max_tokens=8, stream=True)
                           if c.choices)
    assert plain == streamed == expected[1:]
