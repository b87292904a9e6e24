"""The OpenAI API shapes the server reads and writes (pydantic): chat completions (plain and streamed
chunks), image generations, the model list and the error body. Unknown request fields are ignored, as
OpenAI-compatible servers do; fields whose meaning vlmkit cannot honour are refused by name."""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- chat completions: request -------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class MediaURL(_Request):
    url: str
    detail: str | None = None
    num_frames: int | None = Field(default=None, ge=1)  # videos: frames to sample (an extra field)


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: MediaURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value):  # some clients send the URL string itself
        return {"url": value} if isinstance(value, str) else value


class VideoPart(_Request):
    type: Literal["video_url"]
    video_url: MediaURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``; ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are vLLM-style extras."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False  # vLLM's extra: answer exactly max_tokens tokens (benchmarks)
    # accepted only at the values that change nothing
    tools: list | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.tools:
            raise ValueError("tools (function calling) are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by this server")
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported; "
                             "use repetition_penalty (e.g. 1.1)")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return self

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def answer_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- image generations: request ------------------------------------------------------------------
class ImageGenerationRequest(_Request):
    """``POST /v1/images/generations``; ``guidance_scale``, ``temperature``, ``top_k``, ``top_p`` are extras."""

    model: str | None = None
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    guidance_scale: float | None = Field(default=None, ge=0)  # None: the model's generation_config (else 5)
    temperature: float | None = Field(default=None, gt=0, le=10)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)


def parse_request(model: type[BaseModel], body) -> BaseModel:
    """Validate a JSON body against ``model``; a bad body is an ``InputError`` naming the fields."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise InputError(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    """A one-line account of what is wrong: ``messages.0.role: Input should be 'system', ...``."""
    lines = []
    for problem in err.errors()[:3]:
        # drop pydantic's union-branch labels ("str", "list[...]", "function-after[...]") from the path
        path = ".".join(str(p) for p in problem["loc"] if isinstance(p, int) or ("[" not in p and p not in
                                                                                  ("str", "list", "dict")))
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "invalid request: " + "; ".join(lines)


# --- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmkit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
