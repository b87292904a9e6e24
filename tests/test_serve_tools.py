"""OpenAI's tool-calling loop on ``vlmkit serve``: the assistant's ``tool_calls`` and the ``tool`` messages
holding their results are taken back on the next turn and reach the chat template as transformers'
apply_chat_template receives them; a template that writes no tool calls (the families' own) shows a call as
the text the model decoded it from. The legacy ``functions`` / ``function_call`` fields are refused."""

import copy
import json

import httpx
import pytest
from serve_support import engine_for, serve

from vlmkit.builtin import builtin_model_path
from vlmkit.serve.config import ServeConfig
from vlmkit.serve.fields import parse_request
from vlmkit.serve.requests import RequestHandler
from vlmkit.serve.schemas import ChatCompletionRequest

PICK = {"type": "function", "function": {
    "name": "pick", "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
                                   "required": ["colour"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Pick a colour"}]


@pytest.fixture(scope="module")
def server():
    with serve(builtin_model_path()) as running:
        yield running


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def _second_turn(call: dict, result: str = "red is taken") -> list[dict]:
    return ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": result}]


def test_the_second_turn_of_the_tool_loop_shows_the_model_the_call_it_decoded(server):
    first = post(server, "/v1/chat/completions", {"messages": ASK, "tools": [PICK], "tool_choice": "required",
                                                  "max_tokens": 40, "temperature": 0, "logprobs": True}).json()
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls", first
    decoded = "".join(entry["token"] for entry in choice["logprobs"]["content"])  # the model's own text
    call = choice["message"]["tool_calls"][0]
    second = post(server, "/v1/chat/completions", {"messages": _second_turn(call), "tools": [PICK], "max_tokens": 3})
    assert second.status_code == 200, second.text
    # the prompt is the one where the assistant's turn holds, as text, exactly what the model decoded
    sent = post(server, "/tokenize", {"messages": _second_turn(call)}).json()
    as_text = ASK + [{"role": "assistant", "content": decoded},
                     {"role": "tool", "tool_call_id": call["id"], "content": "red is taken"}]
    assert sent["tokens"] == post(server, "/tokenize", {"messages": as_text}).json()["tokens"]
    assert second.json()["usage"]["prompt_tokens"] == sent["count"]


def _template_messages(engine, messages: list[dict]) -> list[dict]:
    request = parse_request(ChatCompletionRequest, {"messages": messages})
    return RequestHandler(engine, ServeConfig(model="m")).engine_messages(request)


def test_tool_calls_and_results_reach_the_template_as_transformers_passes_them():
    engine = engine_for(builtin_model_path())
    call = {"id": "call_1", "type": "function", "function": {"name": "pick", "arguments": "{\"colour\": \"red\"}"}}
    assistant, tool = _template_messages(engine, _second_turn(call))[1:]
    expected_call = {"id": "call_1", "type": "function", "function": {"name": "pick", "arguments": {"colour": "red"}}}
    assert assistant["tool_calls"] == [expected_call]
    assert assistant["content"] == '{"arguments":{"colour":"red"},"name":"pick"}'  # Janus' template shows no calls
    assert tool == {"role": "tool", "content": "red is taken", "tool_call_id": "call_1"}
    # a template that writes tool_calls itself gets the turn's own (empty) content
    writer = copy.copy(engine)
    writer.processor = copy.copy(engine.processor)
    writer.processor.chat_template = "{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}"
    assert _template_messages(writer, _second_turn(call))[1]["content"] == ""


def test_arguments_that_are_not_json_are_shown_as_sent():
    engine = engine_for(builtin_model_path())
    call = {"id": "c", "type": "function", "function": {"name": "pick", "arguments": "{broken"}}
    assistant = _template_messages(engine, _second_turn(call))[1]
    assert assistant["content"] == '{"arguments":"{broken","name":"pick"}'


@pytest.mark.parametrize("body, phrases", [
    ({"functions": [PICK["function"]]}, ["functions", "send tools", "tool_choice"]),
    ({"function_call": {"name": "pick"}}, ["function_call", "send tools", "tool_choice"]),
    ({"messages": ASK + [{"role": "tool", "content": "3"}]}, ["tool_call_id", "role 'tool'"]),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, ["tool_calls", "only an assistant"]),
])
def test_legacy_and_misplaced_tool_fields_are_a_400_naming_the_fix(server, body, phrases):
    response = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, message
    json.dumps(message)  # a plain string
