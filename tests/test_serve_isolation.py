"""A request whose share of a decode step fails is failed alone: the requests that shared the step go on
and give the answers (and pictures) they give alone, whether the fault is in the batched forward pass or
in one request's sampling, for chat and image requests, streamed or not."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_support import engine_for, serve, user

import vlmkit.generation.image_step as image_step
import vlmkit.generation.sampling as sampling
import vlmkit.serve.batching as batching
from vlmkit.serve.config import ServeConfig
from vlmkit.serve.requests import RequestHandler
from vlmkit.serve.events import TextDelta
from vlmkit.serve.scheduler import Scheduler

POISON_SEED = 666  # sampling with this seed raises
LONG = "word " * 40  # a prompt whose positions the poisoned forward pass refuses
INNOCENT_CHATS = [
    {"messages": user("Hi"), "max_tokens": 12, "temperature": 0, "ignore_eos": True},
    {"messages": user("Tell me more"), "max_tokens": 9, "temperature": 0.9, "seed": 5, "ignore_eos": True},
    {"messages": user("A third question?"), "max_tokens": 15, "temperature": 1.2, "top_p": 0.9, "seed": 7,
     "n": 2, "ignore_eos": True},
]
INNOCENT_IMAGES = [{"prompt": "a red square", "seed": 1}, {"prompt": "a blue circle", "seed": 2, "n": 2}]


class Poison(RuntimeError):
    pass


@pytest.fixture
def poisoned_sampling(monkeypatch):
    """Sampling with POISON_SEED raises (text and image steps)."""
    def poisoned(original):
        def next_token(logits, config, generator, *args):
            if generator is not None and generator.initial_seed() == POISON_SEED:
                raise Poison("poisoned sampling")
            return original(logits, config, generator, *args)
        return next_token

    monkeypatch.setattr(batching, "next_token", poisoned(batching.next_token))
    monkeypatch.setattr(sampling, "next_token", poisoned(sampling.next_token))
    monkeypatch.setattr(image_step, "next_token", poisoned(image_step.next_token))


def _thresholds(engine) -> tuple[int, int]:
    """Positions (chat, image) that short prompts never reach in these tests and LONG passes at once."""
    handler = RequestHandler(engine, ServeConfig(model="m"))
    chat = handler.prepare_chat({"messages": user(LONG)})[1].prompt_tokens
    image = handler.prepare_images({"prompt": LONG})[1].prompt_tokens
    return chat - 2, image - 2


@pytest.fixture
def poisoned_forward(janus_dir, monkeypatch):
    """A decode step that holds a row past the poison position raises, for text and for images."""
    engine = engine_for(janus_dir)
    model, text_model = engine.model, engine.model.text_model
    chat_limit, image_limit = _thresholds(engine)
    decode, forward = model.decode, text_model.forward
    in_text_decode = []

    def poisoned_decode(tokens, positions, cache, *args, **kwargs):
        if bool((positions >= chat_limit).any()):
            raise Poison("poisoned forward pass")
        in_text_decode.append(True)
        try:
            return decode(tokens, positions, cache, *args, **kwargs)
        finally:
            in_text_decode.pop()

    def poisoned_text_forward(embeds, positions, mask, *args, **kwargs):
        image_step = mask is None and not in_text_decode  # prefills pass a mask
        if image_step and bool((positions >= image_limit).any()):
            raise Poison("poisoned forward pass")
        return forward(embeds, positions, mask, *args, **kwargs)

    monkeypatch.setattr(model, "decode", poisoned_decode)
    monkeypatch.setattr(text_model, "forward", poisoned_text_forward)


# --- on the scheduler, every request admitted into the same steps ------------------------------
def _run_together(engine, chats, images):
    """Submit every request before the worker starts (so they share every step); each job's outcome or
    error, and its streamed text per choice."""
    handler = RequestHandler(engine, ServeConfig(model="m"))
    scheduler = Scheduler(engine)
    jobs, streams = [], []
    for body in chats:
        stream: dict[int, str] = {}
        streams.append(stream)
        listener = (lambda event, stream=stream: isinstance(event, TextDelta) and
                    stream.__setitem__(event.index, stream.get(event.index, "") + event.text))
        jobs.append(scheduler.submit(handler.prepare_chat(body)[1], listener))
    for body in images:
        jobs.append(scheduler.submit(handler.prepare_images(body)[1]))
    scheduler.start()
    try:
        results = []
        for job in jobs:
            try:
                results.append(job.wait(60))
            except Exception as err:
                results.append(err)
        return results, streams, scheduler.stats()
    finally:
        scheduler.stop()


def _summary(result):
    if isinstance(result, Exception):
        return type(result).__name__
    if hasattr(result, "images"):
        return [image.tobytes() for image in result.images]
    return [(choice.text, choice.finish_reason) for choice in result.choices]


def _alone(engine, chats, images):
    return [_summary(_run_together(engine, [c], [])[0][0]) for c in chats] + \
        [_summary(_run_together(engine, [], [i])[0][0]) for i in images]


@pytest.mark.parametrize("poison", ["poisoned_sampling", "poisoned_forward"])
def test_a_request_that_fails_its_step_fails_alone_and_the_others_answer_as_alone(janus_dir, poison, request):
    engine = engine_for(janus_dir)
    with torch.no_grad():
        expected = _alone(engine, INNOCENT_CHATS, INNOCENT_IMAGES)
    request.getfixturevalue(poison)
    bad_chat = {"messages": user(LONG), "max_tokens": 12, "temperature": 1.0, "seed": POISON_SEED,
                "ignore_eos": True}
    bad_image = {"prompt": LONG, "seed": POISON_SEED}
    chats = [INNOCENT_CHATS[0], bad_chat, *INNOCENT_CHATS[1:]]
    images = [INNOCENT_IMAGES[0], bad_image, INNOCENT_IMAGES[1]]
    results, streams, stats = _run_together(engine, chats, images)
    summaries = [_summary(r) for r in results]
    assert summaries[1] == summaries[5] == "Poison"
    assert [s for i, s in enumerate(summaries) if i not in (1, 5)] == expected
    assert stats["max_requests_in_step"] >= 3  # they did share steps
    for stream, result in zip(streams, results):  # what was streamed is the answer, nothing from the others
        if not isinstance(result, Exception):
            assert [stream.get(c.index, "") for c in result.choices] == [c.text for c in result.choices]


# --- over HTTP, streamed and not --------------------------------------------------------------
def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def _streamed(server, body):
    text, error = {}, None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event["choices"]:
                text[choice["index"]] = text.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return [text[i] for i in sorted(text)], error


def _streamed_images(server, body):
    """(the completed pictures' base64, the error event's body or None) of a streamed image request."""
    pictures, error, kind = [], None, None
    with httpx.stream("POST", server.url + "/v1/images/generations", json={**body, "stream": True},
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "error":
                error = json.loads(line[6:])["error"]
            elif line.startswith("data: ") and kind == "image_generation.completed":
                pictures.append(json.loads(line[6:])["b64_json"])
    return pictures, error


def test_over_http_a_poisoned_request_fails_alone_streamed_or_not(janus_dir, request):
    with serve(janus_dir) as server:
        solo = [[c["message"]["content"] for c in _post(server, "/v1/chat/completions", body).json()["choices"]]
                for body in INNOCENT_CHATS]
        solo_image = _post(server, "/v1/images/generations", INNOCENT_IMAGES[0]).json()["data"]
        request.getfixturevalue("poisoned_sampling")
        bad = {"messages": user("Hello there"), "max_tokens": 12, "temperature": 1.0, "seed": POISON_SEED,
               "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            plain = [pool.submit(_post, server, "/v1/chat/completions", body) for body in INNOCENT_CHATS]
            streamed = [pool.submit(_streamed, server, body) for body in INNOCENT_CHATS]
            bad_plain = pool.submit(_post, server, "/v1/chat/completions", bad)
            bad_streamed = pool.submit(_streamed, server, bad)
            bad_image = pool.submit(_post, server, "/v1/images/generations", {"prompt": "x", "seed": POISON_SEED})
            bad_streamed_image = pool.submit(_streamed_images, server, {"prompt": "x", "seed": POISON_SEED})
            image = pool.submit(_post, server, "/v1/images/generations", INNOCENT_IMAGES[0])
            streamed_image = pool.submit(_streamed_images, server, INNOCENT_IMAGES[0])
        assert [[c["message"]["content"] for c in f.result().json()["choices"]] for f in plain] == solo
        assert [f.result() for f in streamed] == [(texts, None) for texts in solo]
        assert bad_plain.result().status_code == 500 and "Poison" in bad_plain.result().json()["error"]["message"]
        assert bad_streamed.result()[1]["code"] == "internal_error"
        assert bad_image.result().status_code == 500
        assert image.result().json()["data"] == solo_image
        assert streamed_image.result() == ([item["b64_json"] for item in solo_image], None)
        assert bad_streamed_image.result()[1]["code"] == "internal_error"
        assert _post(server, "/v1/chat/completions", INNOCENT_CHATS[0]).status_code == 200


@pytest.mark.parametrize("family", ["llava_onevision_dir", "idefics_resampler_dir"])
def test_a_poisoned_forward_pass_fails_one_request_alone_in_every_family(family, request, monkeypatch):
    engine = engine_for(request.getfixturevalue(family))
    chats = [{**body, "n": 1} for body in INNOCENT_CHATS]
    with torch.no_grad():
        expected = _alone(engine, chats, [])
    handler = RequestHandler(engine, ServeConfig(model="m"))
    limit = handler.prepare_chat({"messages": user(LONG)})[1].prompt_tokens - 2
    decode = engine.model.decode

    def poisoned_decode(tokens, positions, cache, *args, **kwargs):
        if bool((positions >= limit).any()):
            raise Poison("poisoned forward pass")
        return decode(tokens, positions, cache, *args, **kwargs)

    monkeypatch.setattr(engine.model, "decode", poisoned_decode)
    bad = {"messages": user(LONG), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    results, _, stats = _run_together(engine, [chats[0], bad, *chats[1:]], [])
    summaries = [_summary(r) for r in results]
    assert summaries[1] == "Poison" and [s for i, s in enumerate(summaries) if i != 1] == expected
    assert stats["max_requests_in_step"] >= 3


@pytest.mark.parametrize("constraint", [
    {"guided_regex": "(a{1000}){997}"},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "word", "schema": {"type": "string", "pattern": "^(a{1000}){996}$"}}}},
])
def test_a_grammar_too_complex_to_start_is_refused_before_it_reaches_the_worker(janus_dir, constraint):
    """Its seconds of lexer work happen in the request's thread: the scheduler never sees the request."""
    with serve(janus_dir) as server:
        before = server.stats()
        response = _post(server, "/v1/chat/completions", {"messages": user("x"), "max_tokens": 5, **constraint})
        assert response.status_code == 400, response.text
        assert "the constraint is too complex" in response.json()["error"]["message"]
        after = server.stats()
        assert (after["submitted"], after["prefill_s"]) == (before["submitted"], before["prefill_s"])


def test_the_worker_copies_checked_matchers_and_never_waits_on_grammar_compiles(janus_dir, monkeypatch):
    """Compiling holds the grammar cache's lock; the scheduler's worker must not queue behind it."""
    from vlmkit.generation.grammar import GrammarTokenizer

    callers, matcher = [], GrammarTokenizer.matcher

    def recorded(self, *args):
        callers.append(threading.current_thread().name)
        return matcher(self, *args)

    monkeypatch.setattr(GrammarTokenizer, "matcher", recorded)
    with serve(janus_dir) as server:
        response = _post(server, "/v1/chat/completions", {"messages": user("x"), "max_tokens": 6, "n": 2,
                                                          "guided_regex": "(ab|cd){3}"})
    assert response.status_code == 200, response.text
    assert [c["message"]["content"] for c in response.json()["choices"]] and callers
    assert "vlmkit-scheduler" not in callers
