"""``vlmkit serve``: an OpenAI-compatible HTTP server for chat with images and Janus image generation.

``config`` (settings and flags), ``fields`` + ``schemas`` + ``image_schemas`` + ``responses`` (OpenAI
shapes: field types, the chat request, image generation, response bodies), ``requests`` + ``media`` (the
request path: body to task, outcome to body; shared with batch jobs), ``api_errors`` (errors as clients
see them), ``completions`` and ``tokenization`` (``/v1/completions``, ``/tokenize``), ``options``
(logprobs, penalties, logit_bias, JSON grammars and tool calls), ``scheduler`` + ``decoding`` + ``answers``
+ ``batching`` (one worker thread batching every request's decode steps), ``app`` (FastAPI endpoints,
``run_server``) + ``streaming`` (a request's job events, server-sent events), ``metrics`` (``/metrics``
for Prometheus).

Names load on first use, so ``vlmkit.serve.config`` (the CLI's flags) needs neither fastapi nor pydantic."""

from importlib import import_module

_LAZY = {
    "ServeConfig": "vlmkit.serve.config",
    "ServeLimits": "vlmkit.serve.config",
    "ApiError": "vlmkit.serve.api_errors",
    "RequestHandler": "vlmkit.serve.requests",
    "ChatTask": "vlmkit.serve.scheduler",
    "ImageTask": "vlmkit.serve.scheduler",
    "Job": "vlmkit.serve.scheduler",
    "Scheduler": "vlmkit.serve.scheduler",
    "ServerBusy": "vlmkit.serve.scheduler",
    "create_app": "vlmkit.serve.app",
    "run_server": "vlmkit.serve.app",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmkit.serve' has no attribute {name!r}")


__all__ = list(_LAZY)
