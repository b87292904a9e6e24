"""The chat completion request, ``POST /v1/chat/completions`` (pydantic): messages and their content
parts, response formats, vLLM's structured outputs, tools and the template variables, with the checks
that tie the options together. Fields whose meaning vlmkit cannot honour are refused by name.

The field types it is built from are ``fields``'; the response bodies are ``responses``'."""

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from ..generation.grammar import json_constraint
from ..generation.sampling import GREEDY_BELOW
from .fields import Flag, RequestModel, Seed, Text, json_int, json_number, shown_value, valid_unicode


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("a bad word must hold a character other than spaces")
    return text


# --- chat completions: request -------------------------------------------------------------------
class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class MediaURL(RequestModel):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's values; vlmkit's processors use one resolution
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


class CalledFunction(RequestModel):
    name: Annotated[str, Field(strict=True, min_length=1)]
    arguments: Text = ""  # the arguments' JSON text, as an answer's tool_calls give it


class ToolCall(RequestModel):
    """A call an assistant message made (OpenAI's ``tool_calls`` item), sent back with the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: CalledFunction

    @property
    def arguments(self):
        """The arguments as a JSON value ({} for none), as vLLM gives them to chat templates; text that is not
        JSON stays text (OpenAI takes any string, and a model may have written broken JSON)."""
        if not self.function.arguments.strip():
            return {}
        try:
            return json.loads(self.function.arguments)
        except (ValueError, RecursionError):
            return self.function.arguments

    def for_template(self) -> dict:
        """The call as transformers' chat templates read it."""
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name,
                                                               "arguments": self.arguments}}


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back in OpenAI's tool-calling loop
    tool_call_id: Text | None = None  # a tool message's: the call whose result it holds

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message carries tool_calls (the calls the model made), "
                             f"not a {self.role} message; send a tool's result as a message with role 'tool'")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a message with role 'tool' needs the id of the call whose result it "
                             "holds (the assistant message's tool_calls[].id)")
        return self


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
        valid_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            valid_unicode(key)
            _valid_unicode_within(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode_within(item)
    return value


TemplateVariables = Annotated[dict[Text, Any], AfterValidator(_valid_unicode_within)]


def check_continuation(request) -> None:
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
    bad_words: list[Annotated[str, Field(strict=True, min_length=1, max_length=1000), AfterValidator(valid_unicode),
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

    @model_validator(mode="before")
    @classmethod
    def _no_legacy_functions(cls, values):
        """OpenAI's deprecated ``functions`` / ``function_call``: ignoring them would answer in text where a
        forced call was asked for."""
        if isinstance(values, dict):
            for legacy in ("functions", "function_call"):
                if values.get(legacy) is not None:
                    raise ValueError(f"{legacy}: the legacy functions / function_call fields are not supported; "
                                     f"send tools (each {{\"type\": \"function\", \"function\": {{...}}}}) and "
                                     f"tool_choice instead")
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only taken with stream: true; send stream: true or leave "
                             "stream_options out")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        for key in self.logit_bias or {}:
            # a token id has at most 10 digits; a longer key would also overflow int()'s 4300-digit limit
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias: keys are token ids written as strings of at most 10 digits "
                                 f"(e.g. \"50256\"), got {shown_value(key)}")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in [tool.function.name for tool in self.tools or ()]:
            raise ValueError(f"tool_choice: the function {self.tool_choice.function.name!r} is not among tools")
        check_continuation(self)
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

