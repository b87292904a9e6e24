"""A short soak: a couple hundred mixed requests (plain and streamed answers, answers about images,
image generations) at a concurrency of 16, a share of them bad. Every good request succeeds, every bad
one gets a 4xx, nothing gets a 5xx, and the server is healthy afterwards."""

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_support import data_uri, image_part, serve, user

REQUESTS = 200
CONCURRENCY = 16


@pytest.fixture(scope="module")
def server(janus_dir):
    with serve(janus_dir, limits=dict(max_n=2, max_images=2, max_body_bytes=1_000_000)) as running:
        yield running


def _good(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["chat", "chat", "stream", "image chat", "images"])
    if kind == "images":
        return "/v1/images/generations", {"prompt": f"a shape {rng.randrange(100)}", "seed": rng.randrange(10)}
    content = [f"Question {rng.randrange(1000)}?"]
    if kind == "image chat":
        content.insert(0, image_part(data_uri(8 + rng.randrange(24), 8 + rng.randrange(24), rng.randrange(5))))
    body = {"messages": user(*content), "max_tokens": rng.randrange(1, 6), "n": rng.choice([1, 1, 2]),
            "temperature": rng.choice([0, 0.7]), "seed": rng.randrange(100)}
    if kind == "stream":
        body["stream"] = True
    return "/v1/chat/completions", body


BAD = [
    ("/v1/chat/completions", {"messages": user("Hi"), "max_tokens": "5"}),
    ("/v1/chat/completions", {"messages": user("Hi"), "temperature": 1e308 * 10}),
    ("/v1/chat/completions", {"messages": user("Hi"), "seed": 2 ** 64}),
    ("/v1/chat/completions", {"messages": user("Hi \ud800")}),
    ("/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 10_000}),
    ("/v1/chat/completions", {"messages": user(image_part("data:image/png;base64,!!"), "Hi")}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/images/generations", {"prompt": "a cat", "guidance_scale": 1e38}),
    ("/v1/images/generations", {"prompt": ""}),
    ("/v1/chat/completions", "[" * 5000),
]


def _send(client: httpx.Client, path: str, body) -> tuple[int, str]:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if isinstance(body, dict) and body.get("stream"):
        with client.stream("POST", path, content=raw, headers=headers) as response:
            text = "".join(response.iter_text())
        return response.status_code, text
    response = client.post(path, content=raw, headers=headers)
    return response.status_code, response.text


def _ok(path: str, body, status: int, text: str) -> bool:
    if status != 200:
        return False
    if isinstance(body, dict) and body.get("stream"):
        return text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    answer = json.loads(text)
    return len(answer["data"]) == 1 if path.endswith("generations") else len(answer["choices"]) == body["n"]


def test_mixed_traffic_with_bad_requests_every_good_one_succeeds(server):
    rng = random.Random(0)
    work = [(_good(rng), True) if rng.random() > 0.25 else (rng.choice(BAD), False) for _ in range(REQUESTS)]
    before = server.stats()
    with httpx.Client(base_url=server.url, timeout=120) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda item: _send(client, *item[0]), work))
    failures = [(path, body, status, text[:200]) for ((path, body), good), (status, text) in zip(work, results)
                if (good and not _ok(path, body, status, text)) or (not good and not 400 <= status < 500)]
    assert not failures, failures[:5]
    good = sum(1 for _, is_good in work if is_good)
    after = server.stats()
    assert after["completed"] - before["completed"] == good and after["failed"] == before["failed"]
    assert after["max_requests_in_step"] >= 2  # the traffic did share steps
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
