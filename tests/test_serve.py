"""`vlmkit serve` on a real loopback server, driven by the official `openai` client and httpx: answers
equal `Engine.chat` / `Engine.imagine` for the same input, streaming, n choices, stop strings, image
generation, batching of concurrent requests, and cancellation of clients that go away.

A new family joins these tests by adding its checkpoint fixture to CHAT_FAMILIES (and VIDEO_FAMILIES)."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from builders.janus import build_tiny_janus
from serve_support import data_uri, engine_for, engine_messages, image_part, serve, served_text, user

from vlmkit.serve.batching import can_merge

CHAT_FAMILIES = ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"]
VIDEO_FAMILIES = ["llava_onevision_dir"]
API_KEY = "test-key"
LONG_STREAM = 16000  # tokens; cancelled long before the end


@pytest.fixture(scope="module", params=CHAT_FAMILIES)
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def server(model_dir):
    with serve(model_dir, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def engine(model_dir):
    return engine_for(model_dir)


def ask(server, messages, **options):
    return server.chat(messages, **options)


def test_health_and_model_list(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.openai().models.list().data
    assert [m.id for m in models] == [server.config.model_name] and models[0].object == "model"


def test_greedy_answer_with_an_image_equals_engine_chat(server, engine):
    messages = user(image_part(data_uri(40, 30, seed=1)), "What is in this picture?")
    answer = ask(server, messages, max_tokens=12)
    expected = engine.chat(engine_messages(messages), max_new_tokens=12)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.content == served_text(engine, expected.text)
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
        (expected.prompt_tokens, expected.completion_tokens)
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_multi_image_answer_equals_engine_chat(server, engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image_part(data_uri(20, 50, seed=2)), {"type": "text", "text": "and"},
                                             image_part(data_uri(60, 18, seed=3)),
                                             {"type": "text", "text": "Compare them."}]},
                {"role": "assistant", "content": "Two patterns."},
                {"role": "user", "content": "Which is wider?"}]
    answer = ask(server, messages, max_tokens=8, max_completion_tokens=9)  # the newer name wins
    expected = engine.chat(engine_messages(messages), max_new_tokens=9)
    assert answer.choices[0].message.content == served_text(engine, expected.text)
    assert answer.usage.completion_tokens == expected.completion_tokens


def test_streamed_answer_arrives_in_chunks_that_join_to_the_plain_answer(server):
    messages = user("Tell me a story.")
    plain = ask(server, messages, max_tokens=16).choices[0].message.content
    chunks = list(ask(server, messages, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed, not one lump
    # the raw wire format: server-sent events ending with [DONE]
    body = {"model": server.config.model_name, "messages": messages, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_choices_are_indexed_and_reproducible_with_a_seed(server, engine):
    messages = user("Name a colour.")
    options = dict(max_tokens=6, n=3, temperature=1.5, top_p=0.95, seed=11)
    first, second = ask(server, messages, **options), ask(server, messages, **options)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 18
    greedy = ask(server, messages, max_tokens=6, n=2)
    expected = served_text(engine, engine.chat(messages, max_new_tokens=6).text)
    assert [c.message.content for c in greedy.choices] == [expected, expected]


def test_seeded_sampling_equals_engine_chat_whatever_shares_the_batch(server, engine):
    messages = user("Describe the sea.")
    options = dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=1234)
    expected = served_text(engine, engine.chat(messages, max_new_tokens=10, temperature=0.8, top_p=0.9,
                                               seed=1234).text)
    with ThreadPoolExecutor(5) as pool:
        crowd = [pool.submit(ask, server, user(f"Other question {i}?"), max_tokens=12, temperature=1.0)
                 for i in range(4)]
        mine = pool.submit(ask, server, messages, **options)
        assert mine.result().choices[0].message.content == expected
        assert all(f.result().choices for f in crowd)


def test_stop_string_ends_the_answer_before_it_in_plain_and_streamed_answers(server, engine):
    messages = user("Say something long.")
    full = served_text(engine, engine.chat(messages, max_new_tokens=20).text)
    stop = full[6:9]
    expected = full[:full.find(stop)]
    answer = ask(server, messages, max_tokens=20, stop=[stop, "never-appears"])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(server, messages, max_tokens=20, stop=stop,
                                                                      stream=True) if c.choices)
    assert streamed == expected


def test_image_generation_returns_pngs_of_the_native_size_equal_to_engine_imagine(server, engine):
    if not engine.can_generate_images:
        pytest.skip("this family does not generate images")
    result = server.openai().images.generate(model=server.config.model_name, prompt="a red circle", n=2, size="8x8",
                                             response_format="b64_json", extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [(image.format, image.mode, image.size) for image in images] == [("PNG", "RGB", (8, 8))] * 2
    expected = engine.imagine("a red circle", 2, seed=3)
    assert [image.tobytes() for image in images] == [image.tobytes() for image in expected]


def test_concurrent_requests_share_decode_steps_and_each_equals_its_solo_answer(server, engine):
    before = server.stats()
    cases = [(user(image_part(data_uri(16 + 8 * i, 24, seed=i)), "word " * i + "What is it?"), 4 + 3 * i)
             for i in range(6)]
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        futures = [pool.submit(ask, server, messages, max_tokens=budget) for messages, budget in cases]
        drawing = pool.submit(server.openai().images.generate, model=server.config.model_name, prompt="a boat",
                              extra_body={"seed": 1}) if engine.can_generate_images else None
        answers = [f.result().choices[0].message.content for f in futures]
        assert drawing is None or len(drawing.result().data) == 1
    for (messages, budget), answer in zip(cases, answers):
        assert answer == served_text(engine, engine.chat(engine_messages(messages), max_new_tokens=budget).text)
    after = server.stats()
    assert after["completed"] - before["completed"] == len(cases) + (drawing is not None)
    if can_merge(engine.model.new_cache(1, 1)):  # every family now; a cache that cannot join takes turns
        assert after["batched_steps"] > before["batched_steps"]
        assert after["max_requests_in_step"] >= 2


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_answer_equals_engine_chat_and_frames_follow_the_request(family, request, onevision_videos):
    model_dir, clip = request.getfixturevalue(family), onevision_videos["clip"]
    engine = engine_for(model_dir)
    with serve(model_dir, media_root=str(clip.parent)) as server:
        for frames in (None, 4):
            video = {"type": "video_url", "video_url": {"url": clip.name, **({"num_frames": frames} if frames else {})}}
            answer = server.chat(user(video, "What happens?"), max_tokens=6)
            expected = engine.chat(user({"type": "video", "path": str(clip)}, "What happens?"), max_new_tokens=6,
                                   num_frames=frames or server.config.limits.video_frames)
            assert answer.choices[0].message.content == served_text(engine, expected.text)
            assert answer.usage.prompt_tokens == expected.prompt_tokens


# --- cancellation and back-pressure, on a server that decodes one sequence at a time ---------------
@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    # A long context, so the stream below outlasts the test's slowest waits by a wide margin
    # (the tiny model decodes ~400 tokens a second; 512 positions ran out within the test).
    context = LONG_STREAM + 512  # room for the prompt
    model_dir = build_tiny_janus(tmp_path_factory.mktemp("janus_long"), seed=0, max_position_embeddings=context)
    with serve(model_dir, max_batch_rows=1, max_waiting=1) as running:
        yield running


def _long_stream(server):
    """Open a streamed request that would run for tens of seconds; returns (client, response)."""
    http = httpx.Client(timeout=30)
    body = {"messages": user("Go on forever."), "max_tokens": LONG_STREAM, "ignore_eos": True, "stream": True}
    request = http.build_request("POST", server.url + "/v1/chat/completions", json=body)
    response = http.send(request, stream=True)
    lines = response.iter_lines()  # kept: dropping a half-read iterator would close the connection
    while not ('"content"' in (line := next(lines)) and '"content": ""' not in line):
        pass  # past the role chunk, up to the first token
    response.lines = lines
    return http, response


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_clients_that_go_away_free_their_places_at_once(tight):
    before = tight.stats()
    http, response = _long_stream(tight)  # holds the only decode slot
    _wait_for(lambda: tight.stats()["running_rows"] == 1)
    body = {"messages": user("Hello"), "max_tokens": 2}
    with pytest.raises(httpx.ReadTimeout):  # queued behind it, gives up
        httpx.post(tight.url + "/v1/chat/completions", json=body, timeout=0.5)
    _wait_for(lambda: tight.stats()["cancelled"] == before["cancelled"] + 1 and tight.stats()["waiting"] == 0)
    response.close()  # the streaming client goes away too
    http.close()
    _wait_for(lambda: tight.stats()["cancelled"] == before["cancelled"] + 2)
    answer = httpx.post(tight.url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200
    assert tight.stats()["completed"] == before["completed"] + 1  # only this one: the long answer was cut


def test_a_full_queue_answers_503_with_a_clear_message(tight):
    http, response = _long_stream(tight)  # holds the only decode slot
    body = {"messages": user("Hello"), "max_tokens": 2}
    queued = ThreadPoolExecutor(1).submit(httpx.post, tight.url + "/v1/chat/completions", json=body, timeout=30)
    _wait_for(lambda: tight.stats()["waiting"] == 1)
    refused = httpx.post(tight.url + "/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    message = refused.json()["error"]["message"]
    assert "busy" in message and "--max-waiting" in message
    response.close()
    http.close()
    assert queued.result().status_code == 200
    assert httpx.post(tight.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
