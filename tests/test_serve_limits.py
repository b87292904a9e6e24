"""Bad input to `vlmkit serve`: each refused request gets the right status code and a message that says
what to change, and the server answers the next request normally. Also the API key and the media
policy (private addresses, redirects, local files)."""

import base64
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_support import data_uri, image_part, local_image_host, png_bytes, serve, user

API_KEY = "secret"
LIMITS = dict(max_images=2, max_image_pixels=48 * 48, max_video_frames=4, max_body_bytes=100_000, max_n=2,
              default_max_tokens=4)


@pytest.fixture(scope="module")
def server(janus_dir):
    with serve(janus_dir, api_key=API_KEY, limits=LIMITS) as running:
        yield running


def post(server, path, body, key=API_KEY, **options):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **options)


def assert_refused(response, status, *phrases):
    """The status, OpenAI's error shape, the phrases in its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    for phrase in phrases:
        assert phrase in error["message"], error["message"]


def assert_still_serving(server):
    answer = post(server, "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 1})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 1


# --- the API key ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, "wrong"])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/v1/models/m"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/images/generations"), ("GET", "/stats")])
def test_every_endpoint_but_health_needs_the_api_key(server, key, method, path):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.request(method, server.url + path, headers=headers, json={})
    assert_refused(response, 401, "API key")
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key_and_the_openai_client_sees_a_wrong_key_as_an_authentication_error(server):
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_still_serving(server)


# --- chat requests --------------------------------------------------------------------------------
def _video(frames=None):
    video = {"url": "https://example.invalid/clip.mp4"}  # refused before anything is fetched
    if frames:
        video["num_frames"] = frames
    return {"type": "video_url", "video_url": video}


BAD_CHATS = {
    "too many images": ({"messages": user(*[image_part(data_uri(8, 8, i)) for i in range(3)], "Hi")},
                        400, ["3 images", "at most 2", "--max-images"]),
    "too many pixels": ({"messages": user(image_part(data_uri(60, 60)), "Hi")}, 400,
                        ["messages[0].content[0]", "too many pixels", "60x60", "--max-image-pixels"]),
    "too many video frames": ({"messages": user(_video(10), "Hi")}, 400, ["10 frames", "--max-video-frames"]),
    "video for a model without video": ({"messages": user(_video(), "Hi")}, 400, ["does not take video"]),
    "prompt plus max_tokens over the context": ({"messages": user("Hi"), "max_tokens": 1000}, 400,
                                                ["max_tokens (1000)", "context of 512 tokens", "at most"]),
    "prompt alone fills the context": ({"messages": user("word " * 600)}, 400, ["fills the model's context"]),
    "prompt alone fills the context, max_tokens given": ({"messages": user("word " * 600), "max_tokens": 5}, 400,
                                                         ["fills the model's context", "shorten the conversation"]),
    "n over the limit": ({"messages": user("Hi"), "n": 3}, 400, ["n=3", "--max-n"]),
    "max_tokens zero": ({"messages": user("Hi"), "max_tokens": 0}, 400, ["max_tokens"]),
    "no messages": ({"model": "x"}, 400, ["messages", "required"]),
    "empty messages": ({"messages": []}, 400, ["messages"]),
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, ["messages.0.role"]),
    "unknown content part": ({"messages": user({"type": "input_audio", "input_audio": {}})}, 400,
                             ["input_audio", "image_url"]),
    "temperature out of range": ({"messages": user("Hi"), "temperature": 3}, 400, ["temperature"]),
    "too many stop strings": ({"messages": user("Hi"), "stop": list("abcde")}, 400, ["stop", "at most 4"]),
    "tools": ({"messages": user("Hi"), "tools": [{"type": "function", "function": {"description": "f"}}]}, 400,
              ["tools", "name"]),
    "logprobs": ({"messages": user("Hi"), "logprobs": True, "top_logprobs": 21}, 400, ["top_logprobs"]),
    "invalid base64": ({"messages": user(image_part("data:image/png;base64,!!!notbase64"), "Hi")}, 400,
                       ["base64"]),
    "not an image": ({"messages": user(image_part("data:image/png;base64," + base64.b64encode(b"hello").decode()),
                                       "Hi")}, 400, ["not an image"]),
    "placeholder text without an image": ({"messages": user("look: <image_placeholder>")}, 400,
                                          ["image placeholder", "must match"]),
    "file URL": ({"messages": user(image_part("file:///etc/hosts"), "Hi")}, 400, ["file://", "--media-root"]),
    "local path": ({"messages": user(image_part("/etc/hosts"), "Hi")}, 400, ["local paths", "--media-root"]),
    "other scheme": ({"messages": user(image_part("ftp://example.invalid/a.png"), "Hi")}, 400, ["'ftp'"]),
    "unknown model": ({"model": "gpt-4o", "messages": user("Hi")}, 404, ["'gpt-4o'", "does not exist"]),
}


@pytest.mark.parametrize("body,status,phrases", BAD_CHATS.values(), ids=BAD_CHATS.keys())
def test_bad_chat_request_is_refused_clearly_and_the_server_goes_on(server, body, status, phrases):
    assert_refused(post(server, "/v1/chat/completions", body), status, *phrases)
    assert_still_serving(server)


def test_body_over_the_size_limit_is_413_and_the_server_goes_on(server):
    big = {"messages": user(image_part("data:image/png;base64," + "A" * 150_000), "Hi")}
    assert_refused(post(server, "/v1/chat/completions", big), 413, "limit of 100000 bytes", "--max-body-bytes")
    assert_still_serving(server)


def test_headers_over_the_size_limit_are_400_whether_they_arrive_whole_or_in_pieces(server):
    # 70 KiB of headers in one piece passed h11's limit, which only counts headers still arriving
    headers = {"Authorization": f"Bearer {API_KEY}", "x-big": "a" * 70_000}
    assert_refused(httpx.get(server.url + "/health", headers=headers), 400, "limit of 65536 bytes",
                   "--max-header-bytes")
    assert httpx.get(server.url + "/health", headers={"x-small": "a" * 60_000}).status_code == 200
    assert_still_serving(server)


def test_invalid_json_is_400_and_the_server_goes_on(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert_refused(response, 400, "not valid JSON")
    assert_still_serving(server)


def test_unknown_route_is_404_in_openai_error_shape(server):
    assert_refused(httpx.get(server.url + "/v1/nothing", headers=server.headers), 404, "no such route",
                   "/v1/chat/completions")


# --- image generation requests --------------------------------------------------------------------
BAD_IMAGES = {
    "url response format": ({"prompt": "a cat", "response_format": "url"}, ["'url'", "b64_json"]),
    "size not native": ({"prompt": "a cat", "size": "512x512"}, ["'512x512'", "8x8 images only"]),
    "n over the limit": ({"prompt": "a cat", "n": 3}, ["n=3", "--max-n"]),
    "empty prompt": ({"prompt": "   "}, ["prompt is empty"]),
    "no prompt": ({"n": 1}, ["prompt", "required"]),
    "negative guidance": ({"prompt": "a cat", "guidance_scale": -1}, ["guidance_scale"]),
}


@pytest.mark.parametrize("body,phrases", BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_bad_image_request_is_refused_clearly_and_the_server_goes_on(server, body, phrases):
    assert_refused(post(server, "/v1/images/generations", body), 400, *phrases)
    assert_still_serving(server)


# --- where images may come from -------------------------------------------------------------------
def test_loopback_image_urls_and_redirects_are_refused_by_default(server):
    with local_image_host() as port:
        for url in (f"http://127.0.0.1:{port}/image.png", f"http://localhost:{port}/image.png"):
            response = post(server, "/v1/chat/completions", {"messages": user(image_part(url), "Hi")})
            assert_refused(response, 400, "refused private or internal address")
    assert_still_serving(server)


def test_allowed_hosts_open_only_the_named_host_and_redirects_elsewhere_stay_refused(janus_dir):
    with local_image_host() as port, serve(janus_dir, allowed_hosts=("localhost",)) as allowed:
        ok = post(allowed, "/v1/chat/completions",
                  {"messages": user(image_part(f"http://localhost:{port}/image.png"), "Hi"), "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        redirect = f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/image.png"
        response = post(allowed, "/v1/chat/completions", {"messages": user(image_part(redirect), "Hi")})
        assert_refused(response, 400, "redirect to a refused target")
        assert_still_serving(allowed)


def test_media_root_serves_local_files_inside_it_only(janus_dir, tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(16, 16))
    (tmp_path / "outside.png").write_bytes(png_bytes(16, 16))
    with serve(janus_dir, media_root=str(root)) as rooted:
        for url in ("a.png", f"file://{root / 'a.png'}"):
            response = post(rooted, "/v1/chat/completions", {"messages": user(image_part(url), "Hi"), "max_tokens": 2})
            assert response.status_code == 200, response.text
        for url in ("../outside.png", str(tmp_path / "outside.png")):
            response = post(rooted, "/v1/chat/completions", {"messages": user(image_part(url), "Hi")})
            assert_refused(response, 400, "outside media_root")
        assert_still_serving(rooted)


def test_requests_waiting_on_a_slow_media_host_do_not_hold_up_other_requests(janus_dir):
    """More requests than the server has threads, each waiting on an image host that never answers: a text
    chat (its body parsed, its request prepared) is answered while they all still wait."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(128)  # connections are accepted by the kernel and never answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/image.png"
    with serve(janus_dir, allow_private_hosts=True, fetch_timeout_s=5.0) as slow:
        body = {"messages": user(image_part(url), "Hi"), "max_tokens": 2}
        with ThreadPoolExecutor(48) as pool:
            waiting = [pool.submit(post, slow, "/v1/chat/completions", body, None) for _ in range(48)]
            time.sleep(1.0)  # every one of them is waiting on the image host by now
            answered = post(slow, "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2}, None)
            assert answered.status_code == 200, answered.text
            assert not any(request.done() for request in waiting)
            refused = [request.result() for request in waiting]  # each at its fetch's deadline
    silent.close()
    assert all(response.status_code == 400 and "timed out" in response.text for response in refused)
