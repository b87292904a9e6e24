"""The OpenAPI schema the server publishes at ``/openapi.json``: the endpoints read their bodies
themselves (to bound the work before validation), so the request bodies are added here from the same
pydantic models that validate them, with every status an endpoint may answer and its body."""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .completions import CompletionRequest, TextCompletion
from .image_schemas import ImageGenerationRequest, ImagesResponse
from .responses import ChatCompletion, ModelCard, ModelList
from .schemas import ChatCompletionRequest
from .tokenization import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/v1/images/generations": ImageGenerationRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, sent with every 4xx and 5xx."""

    error: ErrorDetail


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse} for status in statuses}


# one server-sent event of a streamed answer (OpenAPI 3.1: the schema describes each event)
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a chunk or an image event as JSON, an "
                                                                        "error body, or [DONE]"},
                             "event": {"type": "string"}}}

# what each route may answer besides 200 (401 only where an API key is set; 503 while loading or busy)
CHAT_RESPONSES = {
    200: {"model": ChatCompletion, "description": "the answer; with stream=true, server-sent "
                                                  "chat.completion.chunk events ending in 'data: [DONE]'",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    **_errors(400, 401, 404, 408, 413, 499, 500, 503)}
COMPLETION_RESPONSES = {
    200: {"model": TextCompletion, "description": "the continuations; with stream=true, server-sent text_completion "
                                                  "events ending in 'data: [DONE]'",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    **_errors(400, 401, 404, 408, 413, 499, 500, 503)}
IMAGE_RESPONSES = {
    200: {"model": ImagesResponse, "description": "the pictures; with stream=true, server-sent "
                                                 "image_generation.partial_image and .completed events",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    **_errors(400, 401, 404, 408, 413, 499, 500, 503)}
TOKENIZE_RESPONSES = {200: {"model": TokenizeResponse}, **_errors(400, 401, 404, 408, 413, 500, 503)}
DETOKENIZE_RESPONSES = {200: {"model": DetokenizeResponse}, **_errors(400, 401, 404, 408, 413, 500, 503)}
MODELS_RESPONSES = {200: {"model": ModelList}, **_errors(401)}
MODEL_RESPONSES = {200: {"model": ModelCard}, **_errors(401, 404)}
STATS_RESPONSES = {200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **_errors(401, 503)}
HEALTH_RESPONSES = {200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                    503: {"content": {"application/json": {"schema": {"type": "object"}}},
                          "description": "the model is loading, or failed to load"}}


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (served at ``/openapi.json``) describe the request bodies too."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="An OpenAI-compatible server for vision-language models (vlmkit).")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in REQUEST_BODIES.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
