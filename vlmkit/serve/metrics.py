"""``GET /metrics``: the server's counters in Prometheus' text format (prometheus-client), one registry
per app. Requests by endpoint and status, prompt and generated tokens, images drawn, time to first
token and time per output token, and, read at each scrape, the queue depth and the rows decoding."""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The counters of one app; ``observe_request`` from the HTTP side, ``observe_job`` from the
    scheduler's worker when a job ends (prometheus-client's metrics are thread-safe)."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vlmkit_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("vlmkit_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generated_tokens = Counter("vlmkit_generation_tokens", "Tokens generated for finished chat requests",
                                        registry=registry)
        self.images = Counter("vlmkit_images_generated", "Images generated", registry=registry)
        self.time_to_first_token = Histogram("vlmkit_time_to_first_token_seconds",
                                             "Seconds from a chat request's queueing to its first token",
                                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram("vlmkit_time_per_output_token_seconds",
                                               "Seconds per generated token after the first, per chat request",
                                               buckets=_LATENCY_BUCKETS, registry=registry)
        self.waiting = Gauge("vlmkit_queue_depth", "Requests waiting for the model", registry=registry)
        self.running_rows = Gauge("vlmkit_running_rows", "Answer rows decoding now", registry=registry)
        self.running_images = Gauge("vlmkit_running_images", "Images being drawn now", registry=registry)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_job(self, job) -> None:
        """Count a job that ended (finished, failed or cancelled) with what it produced."""
        outcome = job.outcome
        if outcome is None:
            return
        self.prompt_tokens.inc(job.task.prompt_tokens)
        if job.kind == "images":
            self.images.inc(len(outcome.images))
            return
        tokens = outcome.completion_tokens
        self.generated_tokens.inc(tokens)
        first = getattr(job, "first_token_at", None)
        if first is not None:
            self.time_to_first_token.observe(first - job.submitted_at)
            per_choice = tokens / max(len(outcome.choices), 1)
            if per_choice > 1:
                self.time_per_output_token.observe((time.perf_counter() - first) / (per_choice - 1))

    def render(self, scheduler) -> bytes:
        """The text a scrape gets; the gauges read from ``scheduler`` now (None: still loading)."""
        if scheduler is not None:
            stats = scheduler.stats()
            self.waiting.set(stats["waiting"])
            self.running_rows.set(stats["running_rows"])
            self.running_images.set(stats["running_images"])
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware that counts every answered request by route and status code. A plain ASGI wrapper,
    not Starlette's ``BaseHTTPMiddleware``, which would pass each chunk of a streamed answer (server-sent
    events) through one more task and queue; here only the response's first message is looked at. A
    request that raised counts as the 500 it became."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")  # the router records the matched route in the scope
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status)
