#!/usr/bin/env python
"""Load test for a running `vlmkit serve`: many concurrent, mixed OpenAI requests; reports throughput,
latency percentiles and failures. Run by hand (not part of CI):

    vlmkit serve --model PATH --port 8000 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 64 --requests 256

The mix (weights adjustable): text-only chat, chat with one or two inline images, streamed chat (time
to first token measured), n=2 sampled chat, and image generation when the model can draw. Exits 1 if
any request failed."""

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import time

import httpx
import numpy as np
from PIL import Image


def inline_image(rng: random.Random) -> dict:
    width, height = rng.randint(32, 320), rng.randint(32, 320)
    pixels = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def make_request(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    question = rng.choice(["What is in this picture?", "Describe the scene.", "Tell me a short story.",
                           "List three colours.", "What happens next?"])
    body = {"max_tokens": rng.randint(max_tokens // 2, max_tokens), "temperature": 0}
    if kind == "images":
        return "/v1/images/generations", {"prompt": question, "n": 1, "seed": rng.randint(0, 10**6)}
    content: list[dict] = [{"type": "text", "text": question}]
    if kind in ("image_chat", "stream"):
        content = [inline_image(rng) for _ in range(rng.choice([1, 1, 2]))] + content
    body["messages"] = [{"role": "user", "content": content}]
    if kind == "stream":
        body.update(stream=True, stream_options={"include_usage": True})
    if kind == "sampled_n2":
        body.update(n=2, temperature=0.8, top_p=0.95, seed=rng.randint(0, 10**6))
    return "/v1/chat/completions", body


async def send(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One request: {'ok', 'latency', 'ttft', 'tokens', 'error'}."""
    start = time.perf_counter()
    result = {"ok": False, "latency": 0.0, "ttft": None, "tokens": 0, "error": None}
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if result["ttft"] is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        result["ttft"] = time.perf_counter() - start
                    if chunk.get("usage"):
                        result["tokens"] = chunk["usage"]["completion_tokens"]
                if not done:
                    raise RuntimeError("stream ended without [DONE]")
        else:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            payload = response.json()
            result["tokens"] = payload.get("usage", {}).get("completion_tokens", 0)
        result["ok"] = True
    except Exception as err:  # every failure is counted and reported, none stops the run
        result["error"] = f"{type(err).__name__}: {err}"
    result["latency"] = time.perf_counter() - start
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def main_async(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        health = await client.get("/health")
        if health.status_code != 200:
            print(f"server not ready: {health.status_code} {health.text}", file=sys.stderr)
            return 1
        weights = dict(text=3, image_chat=3, stream=2, sampled_n2=1, images=0 if args.no_images else 1)
        if weights["images"]:  # only for models that draw
            probe = await client.post("/v1/images/generations", json={"prompt": "a dot", "seed": 0})
            if probe.status_code != 200:
                print(f"image generation unavailable ({probe.status_code}); leaving it out of the mix")
                weights["images"] = 0
        rng = random.Random(args.seed)
        kinds = rng.choices(list(weights), weights=list(weights.values()), k=args.requests)
        requests = [(kind, *make_request(kind, rng, args.max_tokens)) for kind in kinds]
        gate = asyncio.Semaphore(args.concurrency)

        async def run(kind, path, body):
            async with gate:
                return kind, await send(client, path, body)

        before = (await client.get("/stats")).json()
        start = time.perf_counter()
        results = await asyncio.gather(*(run(*request) for request in requests))
        elapsed = time.perf_counter() - start
        after = (await client.get("/stats")).json()

    failures = [(kind, r["error"]) for kind, r in results if not r["ok"]]
    latencies = [r["latency"] for _, r in results if r["ok"]]
    tokens = sum(r["tokens"] for _, r in results if r["ok"])
    print(f"{len(results)} requests, concurrency {args.concurrency}, {elapsed:.1f} s")
    print(f"throughput: {len(latencies) / elapsed:.2f} requests/s, {tokens / elapsed:.1f} generated tokens/s")
    print(f"latency: p50 {percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s, "
          f"max {max(latencies, default=float('nan')):.2f} s")
    ttfts = [r["ttft"] for _, r in results if r["ok"] and r["ttft"] is not None]
    if ttfts:
        print(f"time to first token (streams): p50 {percentile(ttfts, 50):.2f} s, p99 {percentile(ttfts, 99):.2f} s")
    for kind in weights:
        mine = [r["latency"] for k, r in results if k == kind and r["ok"]]
        if mine:
            print(f"  {kind:11s} n={len(mine):4d}  p50 {percentile(mine, 50):6.2f} s  p99 {percentile(mine, 99):6.2f} s"
                  f"  mean {statistics.mean(mine):6.2f} s")
    steps = after.get("steps", 0) - before.get("steps", 0)
    shared = after.get("batched_steps", 0) - before.get("batched_steps", 0)
    print(f"server: {steps} decode steps, {shared} shared by several requests, "
          f"at most {after.get('max_requests_in_step')} requests in one step")
    print(f"failures: {len(failures)}")
    for kind, error in failures[:10]:
        print(f"  {kind}: {error}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    parser.add_argument("--requests", type=int, default=256, help="requests in total")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length (each request draws up to it)")
    parser.add_argument("--no-images", action="store_true", help="leave image generation out of the mix")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
