"""Streamed image generation on POST /v1/images/generations: OpenAI's partial_image and completed
events, read through the openai client, against the built-in model."""

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_support import serve, stats_when

from vlmkit.builtin import builtin_model_path
from vlmkit.serve.image_stream import NEUTRAL_FILL, partial_points


@pytest.fixture(scope="module")
def server():
    with serve(builtin_model_path()) as running:
        yield running


def _picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _generate(server, **options):
    return server.openai().images.generate(model=server.config.model_name, prompt="a red circle on the left",
                                           **options)


def test_partial_images_come_before_the_final_picture_which_equals_the_unstreamed_one(server):
    events = list(_generate(server, stream=True, partial_images=2, extra_body={"seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    assert (final.output_format, final.background, final.quality) == ("png", "opaque", "auto")
    assert final.usage.output_tokens > 0 and final.usage.total_tokens > final.usage.output_tokens
    width, height = _picture(final.b64_json).size
    assert final.size == f"{width}x{height}" == events[0].size
    plain = _generate(server, extra_body={"seed": 3})
    assert _picture(final.b64_json).tobytes() == _picture(plain.data[0].b64_json).tobytes()


def test_a_partial_picture_shows_the_rows_drawn_so_far_over_a_neutral_fill(server):
    first = next(e for e in _generate(server, stream=True, partial_images=1, extra_body={"seed": 5}))
    pixels = np.asarray(_picture(first.b64_json))
    assert first.type == "image_generation.partial_image"
    assert (pixels[-1] == NEUTRAL_FILL).all()  # the bottom row is not drawn halfway through
    assert not (pixels[0] == NEUTRAL_FILL).all()


def test_partial_points_spread_evenly_and_never_reach_the_last_token():
    assert partial_points(16, 0) == []
    assert partial_points(16, 1) == [8]
    assert partial_points(16, 3) == [4, 8, 12]


def test_zero_partial_images_sends_only_the_completed_event(server):
    events = list(_generate(server, stream=True, partial_images=0, extra_body={"seed": 1}))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_n_images_stream_each_with_its_index(server):
    events = list(_generate(server, stream=True, partial_images=1, n=2, extra_body={"seed": 2}))
    partial = [(e.index, e.partial_image_index) for e in events if e.type == "image_generation.partial_image"]
    assert sorted(partial) == [(0, 0), (1, 0)]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [e.index for e in completed] == [0, 1]
    plain = _generate(server, n=2, extra_body={"seed": 2})
    assert [_picture(e.b64_json).tobytes() for e in completed] == \
        [_picture(d.b64_json).tobytes() for d in plain.data]


@pytest.mark.parametrize("field,value", [("partial_images", 4), ("partial_images", -1), ("partial_images", "2"),
                                         ("stream", "yes"), ("stream", 1)])
def test_a_bad_streaming_value_is_a_400_naming_the_field(server, field, value):
    body = {"prompt": "a square", "stream": True, field: value}
    response = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(f"invalid request: {field}:")


def test_the_events_are_server_sent_events_named_by_their_type(server):
    body = {"prompt": "a square", "stream": True, "partial_images": 1, "seed": 4}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, headers=server.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    names = [block.split("\n")[0] for block in blocks]
    assert names == ["event: image_generation.partial_image", "event: image_generation.completed"]
    assert json.loads(blocks[0].split("\n", 1)[1].removeprefix("data: "))["partial_image_index"] == 0


def test_a_client_that_goes_away_mid_stream_frees_its_rows_at_once(server, monkeypatch):
    # the built-in model draws a picture in a fraction of a second: slowed to ~2 s here, so the picture is
    # still being drawn when the server notices the client has gone (else it may finish first)
    from vlmkit.generation import image_step
    draw = image_step.guided_image_token

    def slowly(*args, **kwargs):
        time.sleep(0.03)
        return draw(*args, **kwargs)

    monkeypatch.setattr(image_step, "guided_image_token", slowly)
    before = server.stats()["cancelled"]
    body = {"prompt": "a big blue square", "stream": True, "partial_images": 3, "n": 2, "seed": 6}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, headers=server.headers) as response:
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # leave after the first preview
    stats = stats_when(server, lambda stats: stats["cancelled"] > before and stats["running_images"] == 0)
    assert stats["cancelled"] == before + 1 and stats["running_images"] == 0


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_pictures_come_in_the_asked_output_format(server, output_format):
    plain = _generate(server, extra_body={"seed": 6})
    png = np.asarray(_picture(plain.data[0].b64_json), dtype=np.int16)
    for stream in (False, True):
        result = _generate(server, output_format=output_format, output_compression=90, stream=stream,
                           extra_body={"seed": 6})
        final = list(result)[-1] if stream else result
        picture = _picture(final.b64_json if stream else final.data[0].b64_json)
        assert picture.format == output_format.upper() and final.output_format == output_format
        assert np.abs(np.asarray(picture, dtype=np.int16) - png).mean() < 8  # the same picture, lossily
    assert (plain.output_format, plain.background, plain.size) == ("png", "opaque", f"{png.shape[1]}x{png.shape[0]}")
    assert plain.usage.output_tokens > 0


@pytest.mark.parametrize("body,named", [
    ({"background": "transparent"}, "background"), ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 50}, "output_compression"), ({"quality": 5}, "quality"), ({"style": [1]}, "style"),
    ({"moderation": {"level": 1}}, "moderation"), ({"output_format": "jpeg", "output_compression": 101},
                                                    "output_compression")])
def test_openai_image_options_vlmkit_cannot_honour_are_a_400_naming_them(server, body, named):
    response = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a square", **body},
                          headers=server.headers)
    assert response.status_code == 400 and named in response.json()["error"]["message"]


def test_options_sent_as_null_take_their_defaults(server):
    body = {"prompt": "a square", "seed": 2, "n": None, "stream": None, "top_p": None, "top_k": None,
            "output_format": None, "quality": "high", "style": "vivid", "moderation": "low", "user": "someone"}
    response = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers)
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": None, "stream": None,
            "top_k": None, "top_p": None, "logprobs": None}
    response = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=server.headers)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1
