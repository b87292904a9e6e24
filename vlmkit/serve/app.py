"""The HTTP side of ``vlmkit serve``: a FastAPI app with OpenAI's endpoints over the shared request path
(``requests.RequestHandler``) and the batching ``Scheduler``; API-key checks, body-size limits, server-sent
events and client-disconnect cancellation (``streaming``), and ``run_server`` with a graceful SIGTERM."""

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from . import openapi, tokenization
from .api_errors import ApiError, api_error, body_too_large, method_not_allowed
from .completions import completion_body, completion_stream, prepare_completion
from .config import ServeConfig
from .requests import RequestHandler
from .http import HeaderLimit, listening_socket, uvicorn_config
from .image_stream import image_sse
from .media import names_remote_media
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import RequestCounter, ServerMetrics
from .pages import install_playground
from .scheduler import Scheduler
from .responses import ModelCard, ModelList, error_body
from .streaming import chat_sse, forward_events, job_events, job_outcome, job_outcomes

log = logging.getLogger("vlmkit.serve")

# Requests that name a media URL are prepared on threads of their own: a slow media host holds its request's
# thread for up to --fetch-timeout per URL, and must not hold the threads that parse every request's body and
# prepare the requests that fetch nothing.
FETCHING_THREADS = 16


class ServerState:
    """The loaded model, its request handler and scheduler; empty until loading has finished."""

    def __init__(self, config: ServeConfig, engine=None):
        self.config = config
        self.engine = engine
        self.handler: RequestHandler | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.on_load_failed = None  # run_server stops uvicorn with it
        self.metrics = ServerMetrics()
        self.loader: threading.Thread | None = None
        self.fetching: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    async def prepare(self, body, prepare, *args):
        """``prepare(*args)`` off the event loop, on the fetching threads where ``body`` names a media URL."""
        limiter = None  # anyio's default threads
        if names_remote_media(body):
            if self.fetching is None:
                self.fetching = anyio.CapacityLimiter(FETCHING_THREADS)
            limiter = self.fetching
        return await anyio.to_thread.run_sync(prepare, *args, limiter=limiter)

    def wait_for_load(self) -> None:
        """Wait until the model's loading thread (if any) has finished."""
        if self.loader is not None and self.loader.is_alive():
            self.loader.join()

    def load(self) -> None:
        """Load the model named by the config (run in a thread, so /health answers meanwhile)."""
        from ..engine import Engine
        try:
            self.engine = Engine.load(self.config.model, dtype=self.config.dtype, device=self.config.device,
                                      quantize=self.config.quantize)
            self.attach()
            log.info("model %s loaded; serving as %r", self.config.model, self.config.model_name)
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("could not load the model %s: %s", self.config.model, self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed()

    def attach(self) -> None:
        config = self.config
        self.handler = RequestHandler(self.engine, config)
        self.scheduler = Scheduler(self.engine, max_batch_rows=config.max_batch_rows,
                                   max_batch_images=config.max_batch_images, max_waiting=config.max_waiting)
        self.scheduler.on_job_done = self.metrics.observe_job
        self.scheduler.start()

    def ready(self) -> tuple[RequestHandler, Scheduler]:
        if self.scheduler is None:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200",
                           "server_error", "model_loading")
        return self.handler, self.scheduler

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def create_app(config: ServeConfig, engine=None) -> FastAPI:
    """The app for ``config``; with ``engine`` given it serves that loaded model, else it loads
    ``config.model`` in the background at startup (``/health`` is 503 until then)."""
    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is not None:
            state.attach()
        else:
            state.loader = threading.Thread(target=state.load, name="vlmkit-load", daemon=True)
            state.loader.start()
        yield
        state.close()

    app = FastAPI(title="vlmkit", version=__version__, lifespan=lifespan, docs_url="/docs" if config.docs else None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.vlmkit = state
    openapi.install(app)

    app.add_middleware(HeaderLimit, limit=config.max_header_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics)  # outermost: it counts HeaderLimit's 400s too

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(_route_error(request, err), code=str(err.status_code)),
                            status_code=err.status_code, headers=err.headers)

    # HEAD too: load balancers and `curl -I` probe with it
    @app.api_route("/health", methods=["GET", "HEAD"], responses=openapi.HEALTH_RESPONSES)
    async def health():
        if state.scheduler is not None:
            return {"status": "ok", "model": config.model_name}
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    router = APIRouter(dependencies=[Depends(_authorizer(config.api_key))])

    @router.get("/v1/models", responses=openapi.MODELS_RESPONSES)
    async def models():
        return ModelList(data=[ModelCard(id=config.model_name, created=state.created)]).model_dump()

    @router.get("/v1/models/{model_id:path}", responses=openapi.MODEL_RESPONSES)
    async def model(model_id: str):  # ids may hold "/" (org/name), as OpenAI's route takes them
        if model_id != config.model_name:
            raise ApiError(404, f"the model {model_id[:100]!r} does not exist on this server; it serves "
                                f"{config.model_name!r}", code="model_not_found")
        return ModelCard(id=config.model_name, created=state.created).model_dump()

    @router.get("/metrics", include_in_schema=False)  # Prometheus' text format, not JSON: see docs/serving.md
    async def metrics():
        return Response(state.metrics.render(state.scheduler), media_type=METRICS_CONTENT_TYPE)

    @router.get("/stats", responses=openapi.STATS_RESPONSES)
    async def stats():
        return state.ready()[1].stats()

    @router.post("/v1/chat/completions", responses=openapi.CHAT_RESPONSES)
    async def chat_completions(request: Request):
        try:
            body = await _read_json(request, config.limits.max_body_bytes, config.body_timeout_s)
            handler, scheduler = state.ready()
            scheduler.check_capacity()  # before fetching anything
            parsed, task = await state.prepare(body, handler.prepare_chat, body)
            events: asyncio.Queue = asyncio.Queue()
            job = scheduler.submit(task, forward_events(asyncio.get_running_loop(), events, parsed.stream))
        except Exception as err:
            return _error_response(err)
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(chat_sse(job, events, request, handler.model_name, parsed.n, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return handler.chat_body(parsed, await job_outcome(job, events, request))
        except Exception as err:
            return _error_response(err)

    @router.post("/v1/completions", responses=openapi.COMPLETION_RESPONSES)
    async def completions(request: Request):
        jobs = []
        try:
            body = await _read_json(request, config.limits.max_body_bytes, config.body_timeout_s)
            handler, scheduler = state.ready()
            scheduler.check_capacity()
            parsed, tasks, echoes = await state.prepare(body, prepare_completion, handler, body)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            for prompt_index, task in enumerate(tasks):  # each prompt's events come tagged with its index
                jobs.append(scheduler.submit(task, forward_events(loop, events, parsed.stream, prompt_index)))
        except Exception as err:
            for job in jobs:
                job.cancel()
            return _error_response(err)
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            stream = completion_stream(job_events(jobs, events, request), handler.model_name, parsed, echoes,
                                       include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            outcomes = await job_outcomes(jobs, events, request)
            return completion_body(handler.model_name, parsed, outcomes, echoes)
        except Exception as err:
            return _error_response(err)

    @router.post("/tokenize", responses=openapi.TOKENIZE_RESPONSES)
    async def tokenize(request: Request):
        return await _answer_in_threadpool(request, tokenization.tokenize)

    @router.post("/detokenize", responses=openapi.DETOKENIZE_RESPONSES)
    async def detokenize(request: Request):
        return await _answer_in_threadpool(request, tokenization.detokenize)

    async def _answer_in_threadpool(request: Request, answer):
        """A quick request answered off the event loop (tokenizing, fetching a conversation's images)."""
        try:
            body = await _read_json(request, config.limits.max_body_bytes, config.body_timeout_s)
            handler, _ = state.ready()
            return await state.prepare(body, answer, handler, body)
        except Exception as err:
            return _error_response(err)

    @router.post("/v1/images/generations", responses=openapi.IMAGE_RESPONSES)
    async def image_generations(request: Request):
        try:
            body = await _read_json(request, config.limits.max_body_bytes, config.body_timeout_s)
            handler, scheduler = state.ready()
            scheduler.check_capacity()
            parsed, task = await run_in_threadpool(handler.prepare_images, body)
            if parsed.stream:
                task = replace(task, partial_images=parsed.partial_images or 0)
            events: asyncio.Queue = asyncio.Queue()
            job = scheduler.submit(task, forward_events(asyncio.get_running_loop(), events, parsed.stream))
            if parsed.stream:
                width, height = handler.image_size
                stream = image_sse(job_events([job], events, request), f"{width}x{height}", task.prompt_tokens,
                                   handler.engine.model.num_image_tokens, lambda err: api_error(err).body(),
                                   run_in_threadpool, (parsed.output_format, parsed.output_compression))
                return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            outcome = await job_outcome(job, events, request)
            return await run_in_threadpool(handler.images_body, parsed, task, outcome)
        except Exception as err:
            return _error_response(err)

    app.include_router(router)
    if config.playground:
        install_playground(app, state)
    return app


# --- pieces of the endpoints ---------------------------------------------------------------------
ROUTES = ("/v1/chat/completions, /v1/completions, /v1/images/generations, /v1/models, /v1/models/{id}, /tokenize, "
          "/detokenize, /health, /stats, /metrics and /openapi.json")


def _route_error(request: Request, err: StarletteHTTPException) -> str:
    """The message of a routing error; the requested path is not echoed back (it is the client's own text)."""
    if err.status_code == 404:
        return f"no such route; this server serves {ROUTES}"
    if err.status_code == 405:
        return method_not_allowed(request.method, (err.headers or {}).get("Allow", ""))
    return str(err.detail)


def _authorizer(api_key: str | None):
    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect or missing API key: send the header 'Authorization: Bearer <key>' with "
                                "the key the server was started with", code="invalid_api_key")
    return authorize


async def _read_json(request: Request, limit: int, timeout_s: float):
    """The request body as JSON, refusing (413) bodies over ``limit`` bytes before reading them whole, and
    (408) bodies that take longer than ``timeout_s`` seconds to arrive."""
    def too_large(size: str) -> ApiError:
        return body_too_large(size, limit)

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(declared[:40])
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large(f"over {limit}")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:
        raise ApiError(499, "the client disconnected while sending the request", code="client_closed_request") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} seconds (--body-timeout); "
                            f"send it faster or make it smaller", code="request_timeout") from None
    return await run_in_threadpool(parse_json, bytes(body))  # a large body takes a while: off the event loop


def parse_json(body: bytes):
    """A request body as JSON; malformed, nested too deeply or with an integer longer than any field takes,
    a 400 (never the reader's own errors as a 500)."""
    try:
        return json.loads(body, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read; send a flatter JSON object") from None


_MAX_INT_DIGITS = 40  # no field takes more than 64 bits (20 digits); reading 4,000 digits costs time


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise ApiError(400, f"the request body holds an integer of {len(digits.lstrip('-'))} digits; no field takes "
                            f"more than 64 bits (at most 20 digits)")
    return int(digits)


def _error_response(err: BaseException) -> JSONResponse:
    error = api_error(err)
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# --- the process ---------------------------------------------------------------------------------
def run_server(config: ServeConfig, sock=None) -> int:
    """Serve until SIGTERM or Ctrl-C on ``sock`` (from ``listening_socket``; bound here when not given,
    so a bad --host or --port fails before the model loads). On SIGTERM: stop accepting, let in-flight
    requests finish (up to ``config.shutdown_timeout_s``, then cancel them), exit 0. Returns 1 if the
    model failed to load or the server could not start."""
    import uvicorn

    sock = sock or listening_socket(config.host, config.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    state: ServerState = app.state.vlmkit

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """On the first SIGTERM or Ctrl-C, a deadline: requests still running just before uvicorn would
            cancel their tasks end as a 503, so a stream closes with an error event and [DONE] rather than
            being cut mid-body."""
            if not self.should_exit:
                grace = config.shutdown_timeout_s
                ending = threading.Timer(max(grace - 1.0, grace / 2), state.close)
                ending.daemon = True
                ending.start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn_config(app, config))

    def stop_after_failed_load() -> None:
        server.should_exit = True

    state.on_load_failed = stop_after_failed_load
    # uvicorn re-raises SIGTERM once it has shut down gracefully; with this handler in place that
    # re-raise ends nothing, and the process exits 0 as a service manager expects.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        state.wait_for_load()  # exiting while torch loads in another thread aborts the process
    return 1 if state.load_error or not server.started else 0
