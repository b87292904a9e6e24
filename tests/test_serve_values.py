"""Every bad value a client can send is a 4xx whose message names the field (never a 500): numbers
out of range or not finite, seeds past 64 bits, integers sent as strings, floats or booleans, text
that is not valid Unicode, bodies nested too deeply or holding huge integers. Oversized requests are
refused by cheap checks before any costly work (a 30 MB prompt in well under a second)."""

import gc
import json
import time
import tracemalloc

import httpx
import pytest
from serve_support import data_uri, engine_for, image_part, serve, user

from vlmkit.serve.config import ServeConfig
from vlmkit.serve.requests import RequestHandler

LIMITS = dict(max_image_pixels=40 * 40, max_request_pixels=2000, max_messages=8, max_parts=4)


@pytest.fixture(scope="module")
def server(janus_dir):
    with serve(janus_dir, limits=LIMITS) as running:
        yield running


def post_raw(server, path, raw: bytes):
    return httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


def post(server, path, body):
    """``body`` as JSON the way Python writes it: NaN and Infinity as such, lone surrogates escaped."""
    return post_raw(server, path, json.dumps(body).encode())


def assert_refused(response, *phrases, status=400):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, message


def assert_still_serving(server):
    answer = post(server, "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 1})
    assert answer.status_code == 200, answer.text


CHAT = {"messages": user("Hi"), "max_tokens": 2}
BAD_CHAT_VALUES = {
    "temperature infinite": ({"temperature": float("inf")}, ["temperature", "finite"]),
    "temperature nan": ({"temperature": float("nan")}, ["temperature", "finite"]),
    "temperature a string": ({"temperature": "0.5"}, ["temperature", "valid number"]),
    "temperature a boolean": ({"temperature": True}, ["temperature"]),
    "top_p zero": ({"top_p": 0}, ["top_p", "greater than 0"]),
    "top_p infinite": ({"top_p": float("-inf")}, ["top_p"]),
    "repetition_penalty tiny": ({"repetition_penalty": 5e-324}, ["repetition_penalty", "0.01"]),
    "repetition_penalty huge": ({"repetition_penalty": 1e308}, ["repetition_penalty", "10"]),
    "repetition_penalty infinite": ({"repetition_penalty": float("inf")}, ["repetition_penalty"]),
    "frequency_penalty nan": ({"frequency_penalty": float("nan")}, ["frequency_penalty"]),
    "presence_penalty out of range": ({"presence_penalty": 3}, ["presence_penalty", "2"]),
    "seed past 64 bits": ({"seed": 2 ** 64}, ["seed", "18446744073709551615"]),
    "seed far below": ({"seed": -2 ** 70}, ["seed"]),
    "seed a float": ({"seed": 1.5}, ["seed", "integer"]),
    "max_tokens a string": ({"max_tokens": "5"}, ["max_tokens", "integer", "'5'"]),
    "max_tokens a float": ({"max_tokens": 5.0}, ["max_tokens", "integer"]),
    "max_tokens a boolean": ({"max_tokens": True}, ["max_tokens", "integer"]),
    "max_completion_tokens negative": ({"max_completion_tokens": -1}, ["max_completion_tokens"]),
    "n a string": ({"n": "2"}, ["n:", "integer"]),
    "top_k a float": ({"top_k": 2.0}, ["top_k", "integer"]),
    "stream a string": ({"stream": "true"}, ["stream", "boolean"]),
    "surrogate in chat text": ({"messages": user("hello \ud800")}, ["messages.0.content.0.text", "surrogate"]),
    "surrogate in string content": ({"messages": [{"role": "user", "content": "\udfff"}]},
                                    ["messages.0.content", "surrogate"]),
    "surrogate in a stop string": ({"stop": ["a\ud800"]}, ["stop.0", "surrogate"]),
    "logit_bias key of 5000 digits": ({"logit_bias": {"9" * 5000: 1}}, ["logit_bias", "at most 10 digits"]),
    "logit_bias key of 11 digits": ({"logit_bias": {"1" + "0" * 10: 1}}, ["logit_bias", "at most 10 digits"]),
    "image URL with an unclosed IPv6 bracket": ({"messages": user(image_part("http://[::1/x"), "Hi")},
                                                ["messages[0].content[0]", "malformed URL", "Invalid IPv6"]),
    "image URL with a bracketed non-address": ({"messages": user(image_part("http://[zz]/x"), "Hi")},
                                               ["messages[0].content[0]", "malformed URL"]),
    "data URI with non-ASCII base64": ({"messages": user(image_part("data:image/png;base64,iVBOR\u00e9w0K"), "Hi")},
                                       ["messages[0].content[0]", "not ASCII"]),
    "image detail not OpenAI's": ({"messages": user({"type": "image_url", "image_url": {
        "url": data_uri(), "detail": "ultra"}}, "Hi")}, ["messages.0.content.0.image_url", "detail", "'auto', 'low' or 'high'"]),
    "stream_options without stream": ({"stream_options": {"include_usage": True}},
                                      ["stream_options", "only taken with stream: true"]),
    "image URL holding a NUL": ({"messages": user(image_part("http://example.com/a\x00b.png"), "Hi")},
                                ["messages[0].content[0]", "NUL character"]),
}


@pytest.mark.parametrize("change,phrases", BAD_CHAT_VALUES.values(), ids=BAD_CHAT_VALUES.keys())
def test_bad_chat_value_is_a_400_naming_the_field(server, change, phrases):
    assert_refused(post(server, "/v1/chat/completions", {**CHAT, **change}), *phrases)


IMAGE = {"prompt": "a cat", "seed": 1}
BAD_IMAGE_VALUES = {
    "guidance huge": ({"guidance_scale": 1e38}, ["guidance_scale", "100"]),
    "guidance infinite": ({"guidance_scale": float("inf")}, ["guidance_scale", "finite"]),
    "temperature tiny": ({"temperature": 1e-38}, ["temperature", "0.01"]),
    "temperature nan": ({"temperature": float("nan")}, ["temperature"]),
    "top_p over one": ({"top_p": 1.5}, ["top_p"]),
    "seed past 64 bits": ({"seed": 2 ** 64}, ["seed"]),
    "n a float": ({"n": 1.0}, ["n:", "integer"]),
    "surrogate in the prompt": ({"prompt": "a \ud800 cat"}, ["prompt", "surrogate"]),
    "image placeholder in the prompt": ({"prompt": "a cat like <image_placeholder>"},
                                        ["image placeholder token text <image_placeholder>", "remove it"]),
}


@pytest.mark.parametrize("change,phrases", BAD_IMAGE_VALUES.values(), ids=BAD_IMAGE_VALUES.keys())
def test_bad_image_value_is_a_400_naming_the_field(server, change, phrases):
    assert_refused(post(server, "/v1/images/generations", {**IMAGE, **change}), *phrases)


def test_values_at_the_bounds_are_served(server):
    for change in ({"temperature": 2, "top_p": 1e-300, "seed": 2 ** 64 - 1, "repetition_penalty": 10},
                   {"temperature": 1e-38, "seed": -2 ** 63, "repetition_penalty": 0.01, "top_k": 0}):
        response = post(server, "/v1/chat/completions", {**CHAT, **change})
        assert response.status_code == 200, response.text
    response = post(server, "/v1/images/generations", {**IMAGE, "guidance_scale": 100, "temperature": 0.01})
    assert response.status_code == 200, response.text


def test_a_temperature_too_small_to_divide_by_samples_greedily(server):
    greedy = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 6, "temperature": 0}).json()
    tiny = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 6, "temperature": 1e-38}).json()
    assert tiny["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


@pytest.mark.parametrize("raw,phrase", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "seed": ' + b"7" * 5000 + b"}", "5000 digits"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "seed": -' + b"7" * 5000 + b"}", "5000 digits"),
    (b'{"messages": "\xff"}', "not valid JSON"),
], ids=["deep", "long integer", "long negative integer", "not utf-8"])
def test_bodies_the_reader_cannot_take_are_400s(server, raw, phrase):
    assert_refused(post_raw(server, "/v1/chat/completions", raw), phrase)
    assert_still_serving(server)


# --- bounded work before refusal -----------------------------------------------------------------
class LongestTextSeen:
    """Stands in for the tokenizer's backend and records the longest text it was asked to encode."""

    def __init__(self, backend):
        self.backend, self.longest = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode(self, text, *args, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.backend.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.backend.encode_batch(texts, *args, **kwargs)


def test_a_30_mb_prompt_is_refused_before_it_is_tokenized(server, janus_dir, monkeypatch):
    tokenizer = engine_for(janus_dir).tokenizer
    spy = LongestTextSeen(tokenizer.backend)
    monkeypatch.setattr(tokenizer, "backend", spy)
    raw = json.dumps({"messages": user("word " * 6_000_000), "max_tokens": 1}).encode()
    assert_refused(post_raw(server, "/v1/chat/completions", raw), "the prompt is", "context of 512 tokens")
    raw = json.dumps({"prompt": "cat " * 7_000_000}).encode()
    assert_refused(post_raw(server, "/v1/images/generations", raw), "the image prompt is")
    assert spy.longest < 1_000_000, spy.longest
    assert_still_serving(server)
    assert spy.longest > 0, "the tokenizer spied on is not the one the server uses"


def test_refused_huge_prompts_leave_no_lasting_memory_growth(server):
    """The server runs in this process: after five more 30 MB refusals it holds no more Python memory than
    after the first (the body, its text and its JSON are handed back, not kept). Traced allocations are
    counted rather than resident memory, which glibc's per-thread arenas keep for a while after a free
    depending on which worker thread took the request."""
    raw = json.dumps({"messages": user("word " * 6_000_000), "max_tokens": 1}).encode()
    assert_refused(post_raw(server, "/v1/chat/completions", raw), "the prompt is")
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            assert_refused(post_raw(server, "/v1/chat/completions", raw), "the prompt is")
        deadline = time.monotonic() + 5  # the last handler may still be unwinding when its answer arrives
        while True:
            gc.collect()
            kept_mb = (tracemalloc.get_traced_memory()[0] - before) / 2**20
            if kept_mb < 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before > len(raw), "the requests were not traced"
    assert kept_mb < 4, kept_mb


def test_the_early_size_check_refuses_only_what_surely_cannot_fit(janus_dir):
    engine = engine_for(janus_dir)
    handler = RequestHandler(engine, ServeConfig(model="m"))
    bound = 2 * engine.model.max_context * handler._chars_per_token
    handler.check_prompt_size(["x" * bound, " \n" * bound, "\u3000" * bound])  # spaces never count
    with pytest.raises(Exception, match="shorten it"):
        handler.check_prompt_size(["x" * (bound // 2), "y" * (bound // 2 + 1)])
    # what passes the early check is still measured in tokens after templating
    response = handler.prepare_chat
    with pytest.raises(Exception, match="context"):
        response({"messages": user("x " * (bound // 4))})


def test_images_are_limited_by_their_pixels_summed_over_the_request(server):
    two = user(image_part(data_uri(40, 40, 1)), image_part(data_uri(40, 40, 2)), "Compare")
    assert_refused(post(server, "/v1/chat/completions", {"messages": two}),
                   "messages[0].content[1]", "2000 pixels in all", "--max-request-pixels")
    one = post(server, "/v1/chat/completions", {"messages": user(image_part(data_uri(30, 30, 1)), "Hi"),
                                                "max_tokens": 1})
    assert one.status_code == 200, one.text


def test_messages_and_parts_are_counted_before_validation(server):
    many = [{"role": "user", "content": "Hi"}] * 9
    assert_refused(post(server, "/v1/chat/completions", {"messages": many}), "9 messages", "--max-messages")
    parts = user(*["Hi"] * 5)
    assert_refused(post(server, "/v1/chat/completions", {"messages": parts}), "messages.0.content", "5 parts",
                   "--max-parts")
