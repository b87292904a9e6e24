"""The OpenAI API shapes the server reads and writes (pydantic): chat completions (plain and streamed
chunks), image generations, the model list and the error body. Unknown request fields are ignored, as
OpenAI-compatible servers do; fields whose meaning vlmkit cannot honour are refused by name.

Values are checked as OpenAI's API documents their types, strictly: an integer field takes a JSON
integer (not "5", 5.0 or true), a number field a finite number within its bounds, a string valid
Unicode; so nothing a client sends reaches sampling as inf or nan, or fails later as a 500."""

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from ..errors import InputError
from ..generation.config import SEED_RANGE
from ..generation.grammar import json_constraint
from ..generation.image_step import MAX_GUIDANCE_SCALE
from ..generation.sampling import GREEDY_BELOW
from ..io.tokenizer import unpaired_surrogate


def _nullable_defaults(schema: dict, model) -> None:
    """The published schema allows what ``_null_is_the_default`` takes: null for every option with a default."""
    properties = schema.get("properties", {})
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in properties and not field.is_required() and field.default is not None:
            shown = {k: properties[key].pop(k) for k in ("title", "default", "description") if k in properties[key]}
            properties[key] = {"anyOf": [properties[key], {"type": "null"}], **shown}


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_nullable_defaults)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, values):
        """An explicit null for an option with a default (``"n": null``, ``"stream": null``, as clients send
        options they leave unset) takes that default, as OpenAI's API does."""
        if isinstance(values, dict):
            fields = cls.model_fields
            return {key: value for key, value in values.items()
                    if not (value is None and key in fields and not fields[key].is_required()
                            and fields[key].default is not None)}
        return values


def _valid_unicode(text: str) -> str:
    problem = unpaired_surrogate(text)
    if problem:
        raise ValueError(f"the text holds {problem}; send valid Unicode text")
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("a bad word must hold a character other than spaces")
    return text


def json_int(**bounds):
    """A JSON integer (strict: not a string, float or boolean) within ``bounds``."""
    return Annotated[int, Field(strict=True, **bounds)]


def json_number(**bounds):
    """A finite JSON number within ``bounds`` (integers are taken as floats; strings and booleans are not)."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


Text = Annotated[str, Field(strict=True), AfterValidator(_valid_unicode)]
Flag = Annotated[bool, Field(strict=True)]
Seed = json_int(ge=SEED_RANGE[0], le=SEED_RANGE[1])


# --- chat completions: request -------------------------------------------------------------------
class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class MediaURL(RequestModel):
    url: Text
    detail: Text | None = None
    num_frames: json_int(ge=1) | None = None  # videos: frames to sample (an extra field)


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: MediaURL | Text  # the schema says a bare URL string is taken too

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value):  # some clients send the URL string itself
        return {"url": value} if isinstance(value, str) else value


class VideoPart(RequestModel):
    type: Literal["video_url"]
    video_url: MediaURL | Text  # the schema says a bare URL string is taken too

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


class StreamOptions(RequestModel):
    include_usage: Flag = False


def _json_schema(value):
    if not isinstance(value, (dict, bool)):
        raise ValueError(f"a JSON Schema is an object (or true/false), got {type(value).__name__}")
    return value


JsonSchema = Annotated[dict | Flag, AfterValidator(_json_schema)]  # a schema is an object or true/false, never a number


class JsonSchemaFormat(RequestModel):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    description: Text | None = None
    schema_: JsonSchema = Field(default_factory=dict, alias="schema")
    strict: Flag | None = None


class ResponseFormat(RequestModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type 'json_schema' needs a json_schema object "
                             "({\"name\": ..., \"schema\": {...}})")
        return self


def _schema_or_its_text(value):
    """vLLM takes a JSON Schema as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("a JSON Schema given as a string must be its JSON text") from None
    return _json_schema(value)


SchemaOrText = Annotated[dict | Flag | Text, AfterValidator(_schema_or_its_text)]


class StructuredOutputs(RequestModel):
    """vLLM's ``structured_outputs``: the answer follows exactly one of a JSON Schema (``json``), any JSON
    object (``json_object``), a regular expression, one of the ``choice`` strings, or a Lark/GBNF grammar."""

    json_: SchemaOrText | None = Field(None, alias="json")
    json_object: Flag | None = None
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1, max_length=1024)
    grammar: Text | None = None
    whitespace_pattern: Text | None = None
    structural_tag: Text | dict | None = None

    @model_validator(mode="after")
    def _one(self):
        for unsupported in ("whitespace_pattern", "structural_tag"):
            if getattr(self, unsupported) is not None:
                raise ValueError(f"{unsupported} is not supported; leave it out (JSON answers are compact)")
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice and grammar")
        return self

    @property
    def constraint(self) -> tuple[str, str]:
        """(kind, source) as ``GrammarTokenizer.matcher`` takes them."""
        if self.json_ is not None or self.json_object:
            return json_constraint(self.json_)
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


class FunctionDefinition(RequestModel):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Text | None = None
    parameters: JsonSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Flag | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: Annotated[str, Field(strict=True, min_length=1)]


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionName


def _valid_unicode_within(value):
    """A JSON value whose strings (keys too) are all valid Unicode."""
    if isinstance(value, str):
        _valid_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key)
            _valid_unicode_within(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode_within(item)
    return value


TemplateVariables = Annotated[dict[Text, Any], AfterValidator(_valid_unicode_within)]


def _check_continuation(request) -> None:
    """``continue_final_message`` continues the final assistant message, so no new turn may be prompted."""
    if request.continue_final_message:
        if request.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be combined with add_generation_prompt, whose "
                             "default is true; send add_generation_prompt: false too")
        if not request.messages or request.messages[-1].role != "assistant":
            raise ValueError("continue_final_message: the final message must be the assistant's text to continue")


# vLLM's chat-completion options that vlmkit's server does not implement, with the values that change nothing
UNSUPPORTED_VLLM_OPTIONS = {
    "use_beam_search": (False,), "best_of": (1,), "length_penalty": (1, 1.0), "echo": (False,),
    "chat_template": (),  # a template from the client: vLLM too refuses it unless told to trust requests
    "truncate_prompt_tokens": (), "prompt_logprobs": (0,),
    "return_tokens_as_token_ids": (False,), "spaces_between_special_tokens": (True,), "mm_processor_kwargs": ({},),
    "logits_processors": ([],), "documents": ([],), "repetition_detection": (), "vllm_xargs": ({},),
}


class ChatCompletionRequest(RequestModel):
    """``POST /v1/chat/completions``. vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty``,
    ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``allowed_token_ids``, ``bad_words``,
    ``include_stop_str_in_output``, ``skip_special_tokens``, ``structured_outputs``) have vLLM's meaning; the
    ones in ``UNSUPPORTED_VLLM_OPTIONS`` are refused.
    A temperature under ``GREEDY_BELOW`` samples as 0 (greedy): dividing logits by less would overflow."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: json_int(ge=1) | None = None
    max_completion_tokens: json_int(ge=1) | None = None
    temperature: json_number(ge=0, le=2) | None = None
    top_p: json_number(gt=0, le=1) | None = None
    n: json_int(ge=1) = 1
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    top_k: json_int(ge=-1, le=2 ** 31 - 1) | None = None  # 0 or vLLM's -1: off
    repetition_penalty: json_number(ge=0.01, le=10) | None = None
    ignore_eos: Flag = False  # vLLM's extra: answer exactly max_tokens tokens (benchmarks)
    structured_outputs: StructuredOutputs | None = None  # vLLM's; its older guided_* names below
    guided_json: SchemaOrText | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=1024)
    guided_grammar: Text | None = None
    guided_whitespace_pattern: Text | None = None
    allowed_token_ids: list[json_int(ge=0, le=2 ** 31 - 1)] | None = Field(None, min_length=1, max_length=1 << 20)
    bad_words: list[Annotated[str, Field(strict=True, min_length=1, max_length=1000), AfterValidator(_valid_unicode),
                              AfterValidator(_not_blank)]] | None = Field(None, max_length=1024)
    include_stop_str_in_output: Flag = False
    skip_special_tokens: Flag = True
    add_generation_prompt: Flag = True
    continue_final_message: Flag = False  # the answer continues the final (assistant) message's text
    chat_template_kwargs: TemplateVariables | None = None  # variables the chat template reads
    min_p: json_number(ge=0, le=1) | None = None  # tokens below min_p x the top token's probability are not drawn
    min_tokens: json_int(ge=0, le=2 ** 31 - 1) | None = None  # no end (EOS, stop_token_ids) before this many tokens
    stop_token_ids: list[json_int(ge=0, le=2 ** 31 - 1)] | None = Field(None, max_length=1024)  # these tokens end it
    logprobs: Flag = False
    top_logprobs: json_int(ge=0, le=20) | None = None
    logit_bias: dict[Text, json_number(ge=-100, le=100)] | None = None  # token id (a string) -> bias
    frequency_penalty: json_number(ge=-2, le=2) | None = None
    presence_penalty: json_number(ge=-2, le=2) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    GREEDY_BELOW: ClassVar[float] = GREEDY_BELOW
    UNSUPPORTED_OPTIONS: ClassVar[dict] = UNSUPPORTED_VLLM_OPTIONS

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_vllm_options(cls, values):
        """vLLM's options this server does not implement are refused unless they ask for what it does anyway
        (silently ignoring one would answer something other than what was asked)."""
        if isinstance(values, dict):
            for name, neutral in cls.UNSUPPORTED_OPTIONS.items():
                value = values.get(name)
                if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
                    raise ValueError(f"{name}: this vLLM option is not supported by vlmkit's server; leave it out")
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        for key in self.logit_bias or {}:
            # a token id has at most 10 digits; a longer key would also overflow int()'s 4300-digit limit
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias: keys are token ids written as strings of at most 10 digits "
                                 f"(e.g. \"50256\"), got {_shown(key)}")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in [tool.function.name for tool in self.tools or ()]:
            raise ValueError(f"tool_choice: the function {self.tool_choice.function.name!r} is not among tools")
        _check_continuation(self)
        budget = self.answer_budget
        if self.min_tokens and budget is not None and self.min_tokens > budget:
            raise ValueError(f"min_tokens: {self.min_tokens} is more than max_tokens ({budget}); lower it")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice: 'required' needs tools")
        if self.forced_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with a tool_choice that forces a tool call")
        self._structured()  # one structured_outputs form at most, and not beside the others
        return self

    def _structured(self) -> StructuredOutputs | None:
        if self.guided_whitespace_pattern is not None:
            raise ValueError("guided_whitespace_pattern is not supported; leave it out (JSON answers are compact)")
        older = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                 "grammar": self.guided_grammar}
        older = {name: value for name, value in older.items() if value is not None}
        if len(older) + (self.structured_outputs is not None) > 1:
            raise ValueError("structured_outputs: give one of structured_outputs, guided_json, guided_regex, "
                             "guided_choice and guided_grammar")
        structured = self.structured_outputs or (StructuredOutputs.model_validate(older) if older else None)
        if structured is not None and (self.forced_tools or (self.response_format is not None
                                                               and self.response_format.type != "text")):
            raise ValueError("structured_outputs: cannot be combined with response_format or a forced tool call")
        return structured

    @property
    def structured(self) -> StructuredOutputs | None:
        """vLLM's structured output the answer must follow (``structured_outputs`` or a ``guided_*`` field)."""
        return self._structured()

    @property
    def forced_tools(self) -> list["Tool"]:
        """The tools the answer must call: the named one, every one for "required", none otherwise."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [tool for tool in self.tools if tool.function.name == self.tool_choice.function.name]
        return list(self.tools or ()) if self.tool_choice == "required" else []

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def answer_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- tokenize / detokenize (vLLM's) -----------------------------------------------------------------
class TokenizeRequest(RequestModel):
    """``POST /tokenize``: a ``prompt`` as it is (with BOS unless ``add_special_tokens`` is false), or chat
    ``messages`` as ``/v1/chat/completions`` builds their prompt (chat template, image tokens)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Flag = True  # for a prompt; a chat template writes its own
    add_generation_prompt: Flag = True
    continue_final_message: Flag = False
    chat_template_kwargs: TemplateVariables | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (text) or messages (a conversation), not both")
        _check_continuation(self)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the model's context: the longest prompt and answer together
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    """``POST /detokenize``: token ids back to text (special tokens included, as vLLM decodes them)."""

    model: Text | None = None
    tokens: list[json_int(ge=0, le=2 ** 31 - 1)] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


# --- image generations: request ------------------------------------------------------------------
class ImageGenerationRequest(RequestModel):
    """``POST /v1/images/generations``; ``guidance_scale``, ``temperature``, ``top_k``, ``top_p`` are extras."""

    model: Text | None = None
    prompt: Text
    n: json_int(ge=1) = 1
    size: Text | None = None
    response_format: Text | None = None
    seed: Seed | None = None
    guidance_scale: json_number(ge=0, le=MAX_GUIDANCE_SCALE) | None = None  # None: the model's generation_config (else 5)
    temperature: json_number(ge=0.01, le=10) | None = None
    top_k: json_int(ge=0, le=2 ** 31 - 1) = 0
    top_p: json_number(gt=0, le=1) = 1.0
    stream: Flag = False  # server-sent events: partial pictures, then each finished one
    partial_images: json_int(ge=0, le=3) | None = None  # pictures so far sent while streaming
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: json_int(ge=0, le=100) | None = None  # jpeg and webp: 100 keeps the most detail
    background: Literal["auto", "opaque", "transparent"] | None = None  # Janus draws opaque pictures only
    # OpenAI's hints with one meaning here (Janus draws every picture the one way; no moderation pass)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: Text | None = None

    @model_validator(mode="after")
    def _drawable(self):
        if self.background == "transparent":
            raise ValueError("background: 'transparent' is not available: Janus draws opaque pictures; send "
                             "'opaque' or 'auto', or leave it out")
        if self.output_compression is not None and self.output_format == "png":
            raise ValueError("output_compression: applies to output_format 'jpeg' or 'webp' (PNG is lossless)")
        return self


def parse_request(model: type[BaseModel], body) -> BaseModel:
    """Validate a JSON body against ``model``; a bad body is an ``InputError`` naming the fields."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise InputError(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    """A one-line account of what is wrong, naming each field and the value it got:
    ``messages.0.role: Input should be 'system', ... (got 'robot')``."""
    problems = [(_field_path(problem["loc"]), problem) for problem in err.errors()]
    lines = []
    for path, problem in problems:
        # a union's other branches ("Input should be a valid list" beside a problem inside the string)
        if problem["type"].endswith("_type") and any(
                other is not problem and other_path[:len(path)] == path and
                (len(other_path) > len(path) or not other["type"].endswith("_type"))
                for other_path, other in problems):
            continue
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and problem["type"] != "value_error"):
            message += f" (got {_shown(value)})"
        name = ".".join(str(p) for p in path)
        lines.append(f"{name}: {message}" if name else message)
        if len(lines) == 3:
            break
    return "invalid request: " + "; ".join(lines)


def _field_path(loc: tuple) -> tuple:
    """``loc`` without pydantic's union-branch labels ("str", "list[...]", "function-after[...]") and the
    tag a content part's type adds (``content.0.text.text`` is ``content.0.text``)."""
    path = [p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "list", "dict", "int",
                                                                               "float", "bool"))]
    return tuple(p for i, p in enumerate(path)
                 if not (i and isinstance(path[i - 1], int) and p in _PART_TAGS and i + 1 < len(path)))


_PART_TAGS = ("text", "image_url", "video_url")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chunk_events(kind: str, model: str, prefix: str):
    """``event(choices, usage=None)``: one server-sent event of a streamed answer, a chunk of ``kind``
    ("chat.completion.chunk", "text_completion"), every chunk with the same id (``prefix``-...) and time."""
    chunk_id, created = new_id(prefix), int(time.time())

    def event(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": chunk_id, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    return event


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
    background: Literal["opaque"] = "opaque"
    output_format: str = "png"
    quality: Literal["auto"] = "auto"
    size: str | None = None
    usage: dict | None = None


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
