"""The request path shared by the HTTP server and batch jobs: an OpenAI request body becomes a task the
scheduler runs (messages to the Engine's content blocks, media fetched under the server's policy and
limits, the prompt checked against the context), and the scheduler's outcome becomes the OpenAI
response body. Bad input is an ``ApiError`` with a status code and a message, never a crash.
The media a request names are loaded by ``media``; ``/tokenize`` and ``/detokenize`` are ``tokenization``'s.

Everything here blocks (fetching, decoding media, tokenising): the app runs it in a worker thread."""

import functools
import inspect

from ..io.chat_template import render_conversation, template_variables
from ..models.janus.image_generation import image_generation_config
from .api_errors import ApiError, api_error
from .config import ServeConfig
from .fields import parse_request, shown_value
from .image_schemas import ImageData, ImageGenerationRequest, ImagesResponse
from .media import MediaLoading
from .responses import AssistantMessage, ChatCompletion, Choice, Usage
from .schemas import ChatCompletionRequest
from .events import ChatOutcome, ImageOutcome
from .image_stream import completed_usage, encoded_base64
from .completions import completion_body, prepare_completion
from .options import chat_options
from .scheduler import ChatTask, ImageTask

# template variables the server sets itself: chat_template_kwargs cannot replace them
_SERVER_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "continue_final_message", "tools",
                                        "documents", "chat_template"})


def content_texts(content) -> list[str]:
    """The text of a message's content (a string, or the text parts of a list)."""
    if isinstance(content, str):
        return [content]
    return [part.text for part in content or () if part.type == "text"]


def message_texts(messages) -> list[str]:
    """The text of every message the chat template writes: contents, and the tool calls sent back."""
    return [*(text for message in messages for text in content_texts(message.content)),
            *(call.function.arguments for message in messages for call in message.tool_calls or ())]


def json_strings(value) -> list[str]:
    """Every string in a JSON value (template variables: the template may write any of them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    return [text for item in value for text in json_strings(item)] if isinstance(value, list) else []


_ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.split() takes for space


def _solid_chars(text: str) -> int:
    """Characters that are not whitespace (counted fast for ASCII text, exactly for any text)."""
    if text.isascii():
        return len(text) - sum(text.count(c) for c in _ASCII_SPACE)
    return sum(map(len, text.split()))


class RequestHandler(MediaLoading):
    """Turns request bodies into scheduler tasks and outcomes into response bodies, for one loaded model
    (its media loading is ``MediaLoading``'s; ``/tokenize`` and ``/detokenize`` are ``tokenization``'s)."""

    def __init__(self, engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.limits = config.limits
        self.policy = config.media_policy()

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def check_model(self, name: str | None) -> None:
        """A request naming another model is a 404, as OpenAI's API answers."""
        if name and name not in (self.model_name, self.config.model):
            raise ApiError(404, f"the model {name!r} does not exist on this server; it serves {self.model_name!r}",
                           code="model_not_found")

    # --- chat ---------------------------------------------------------------------------------------
    def prepare_chat(self, body) -> tuple[ChatCompletionRequest, ChatTask]:
        """Validate a chat body and build its task (fetches and decodes the media it names). The cheap checks
        (counts, sizes, the prompt's characters against the context) come before any costly work."""
        self.check_chat_shape(body)
        request = parse_request(ChatCompletionRequest, body)
        self.check_model(request.model)
        self.check_counts(request, request.n)
        variables = self.template_variables(request.chat_template_kwargs)
        self.check_prompt_size([*message_texts(request.messages), *json_strings(variables)])
        options = chat_options(request, self.engine)
        messages = self.engine_messages(request)
        inputs = self.engine.prepare_chat(messages, add_generation_prompt=request.add_generation_prompt,
                                          continue_final_message=request.continue_final_message, **variables)
        budget = self.answer_budget(request, int(inputs["input_ids"].shape[1]),
                                    "the conversation or send fewer images")
        return request, ChatTask(inputs, self.sampling_config(request, budget), budget, request.n,
                                 request.stop_strings, request.ignore_eos, request.include_stop_str_in_output,
                                 request.skip_special_tokens,
                                 "" if request.continue_final_message else self.answer_prefix, options)

    def check_counts(self, request, choices: int) -> None:
        """Refuse more choices (``n``, times the prompts of a completion) or stop strings than the server takes."""
        limits = self.limits
        if choices > limits.max_n:
            asked = f"n={request.n}" if choices == request.n else f"{choices // request.n} prompts x n={request.n}"
            raise ApiError(400, f"{asked} is more than this server's limit of {limits.max_n} choices per request "
                                f"(--max-n)")
        if len(request.stop_strings) > limits.max_stop:
            raise ApiError(400, f"stop has {len(request.stop_strings)} strings; at most {limits.max_stop} are allowed")

    def answer_budget(self, request, prompt: int, shorten: str) -> int:
        """The tokens a request's answer may take after a prompt of ``prompt`` tokens: its max_tokens, or the
        server's default (more where min_tokens asks for more), within the model's context; ``shorten``
        says what the error tells the client to shorten."""
        context = self.engine.model.max_context
        budget = request.answer_budget
        if prompt >= context:  # no max_tokens can help: say so, rather than "lower max_tokens to at most 0"
            raise ApiError(400, f"the prompt is {prompt} tokens long and fills the model's context of {context} "
                                f"tokens; shorten {shorten}")
        if budget is None:
            budget = min(max(self.limits.default_max_tokens, request.min_tokens or 0), context - prompt)
            if request.min_tokens and request.min_tokens > budget:
                raise ApiError(400, f"min_tokens: {request.min_tokens} tokens do not fit after the prompt "
                                    f"({prompt} tokens) in the model's context of {context} tokens; lower it")
        elif prompt + budget > context:
            raise ApiError(400, f"the prompt ({prompt} tokens) plus max_tokens ({budget}) is more than the model's "
                                f"context of {context} tokens; lower max_tokens to at most {max(context - prompt, 0)}"
                                f" or shorten the prompt")
        return budget

    def template_variables(self, values: dict | None) -> dict:
        """``chat_template_kwargs`` that the checkpoint's chat template reads (others are ignored, as a
        template ignores them); never the ones the server sets itself."""
        if not values:
            return {}
        read = template_variables(getattr(self.engine.processor, "chat_template", None) or "") - \
            self._reserved_template_names
        return {name: value for name, value in values.items() if name in read}

    @functools.cached_property
    def _reserved_template_names(self) -> frozenset:
        """What a template variable may not be called: the server's own variables and the parameters of the
        functions the variables are passed through (they would collide with them)."""
        functions = (self.engine.prepare_chat, getattr(self.engine.processor, "apply_chat_template", None),
                     self.engine.tokenizer.apply_chat_template, render_conversation)
        return _SERVER_TEMPLATE_VARIABLES | frozenset(
            name for function in functions if function is not None
            for name in inspect.signature(function).parameters)

    @functools.cached_property
    def answer_prefix(self) -> str:
        """The whitespace the chat template writes between its generation prompt and an assistant's answer
        (Janus: one space, which the model writes as the start of its first token); answers drop it."""
        probe = "vlmkit-answer"
        asked = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        answered = {"role": "assistant", "content": [{"type": "text", "text": probe}]}
        try:
            prompt = self.engine.processor.apply_chat_template([asked], add_generation_prompt=True)
            full = self.engine.processor.apply_chat_template([asked, answered])
        except Exception:  # a template that cannot render this probe: leave answers as they come
            return ""
        if not isinstance(full, str) or not full.startswith(prompt) or probe not in full[len(prompt):]:
            return ""
        between = full[len(prompt):full.index(probe, len(prompt))]
        return between if between.isspace() else ""

    def check_chat_shape(self, body) -> None:
        """Refuse too many messages, or parts in one message, before the body is validated part by part."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return  # validation names what is wrong
        if len(messages) > self.limits.max_messages:
            raise ApiError(400, f"messages: the request has {len(messages)} messages; this server takes at most "
                                f"{self.limits.max_messages} (--max-messages)")
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and len(content) > self.limits.max_parts:
                raise ApiError(400, f"messages.{i}.content: {len(content)} parts; this server takes at most "
                                    f"{self.limits.max_parts} per message (--max-parts)")

    def check_prompt_size(self, texts, what: str = "the prompt") -> None:
        """Refuse text that cannot fit the model's context whatever it tokenizes to, before tokenizing or
        templating it. No token covers more characters than the longest entry of the vocabulary, so text
        with more than context x that many non-space characters needs more tokens than the context holds;
        whitespace is left out (a template may strip it, a normalizer fold runs of it) and the bound is
        doubled for normalizers that merge characters (NFC), so only text that surely overflows is refused."""
        per_token = self._chars_per_token
        if per_token is None:
            return
        texts = list(texts)
        context = self.engine.model.max_context
        bound = 2 * context * per_token
        if sum(map(len, texts)) <= bound:  # the common case: nothing more to count
            return
        solid = sum(_solid_chars(text) for text in texts)
        if solid > bound:
            raise ApiError(400, f"{what} is {solid} characters long (not counting spaces): more tokens than the "
                                f"model's context of {context} tokens can hold; shorten it")

    @functools.cached_property
    def _chars_per_token(self) -> int | None:
        """The most characters one token can stand for: the longest vocabulary entry (None if unknown)."""
        backend = getattr(self.engine.tokenizer, "backend", None)
        try:
            vocab = backend.get_vocab(with_added_tokens=True)
        except Exception:  # a tokenizer without a readable vocabulary: no early refusal
            return None
        return max(map(len, vocab), default=0) or None

    def sampling_config(self, request: ChatCompletionRequest, budget: int):
        """The request's generation settings over the checkpoint's; temperature 0 is greedy. An omitted
        temperature is OpenAI's default, 1."""
        temperature = 1.0 if request.temperature is None else request.temperature
        if temperature < request.GREEDY_BELOW:
            temperature = 0.0
        base = self.engine.model.generation_config
        options = dict(do_sample=temperature > 0, max_new_tokens=budget, seed=request.seed,
                       repetition_penalty=request.repetition_penalty or 1.0)
        if temperature > 0:  # as Engine.chat: top_k off unless asked for
            options.update(temperature=temperature, top_p=request.top_p or 1.0, top_k=max(request.top_k or 0, 0),
                           min_p=request.min_p or None)
        if request.min_tokens:  # vLLM's min_tokens holds back the stop tokens too
            options.update(min_new_tokens=request.min_tokens,
                           eos_token_id=[*base.eos_token_ids, *(request.stop_token_ids or ())])
        return base.updated(**options)


    def chat_body(self, request: ChatCompletionRequest, outcome: ChatOutcome) -> dict:
        """The ``chat.completion`` response body."""
        choices = [Choice(index=c.index, message=AssistantMessage(content=None if c.tool_calls else c.text,
                                                                  tool_calls=c.tool_calls),
                          finish_reason=c.finish_reason,
                          logprobs=None if c.logprobs is None else {"content": c.logprobs})
                   for c in outcome.choices]
        usage = Usage.of(outcome.prompt_tokens, outcome.completion_tokens)
        return ChatCompletion(model=self.model_name, choices=choices, usage=usage).model_dump()

    # --- images -------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the images the model draws: Janus's VQ decoder upsamples its token grid by 2
        per level after the first (24 tokens x 16 = 384 px for Janus-Pro)."""
        if not self.engine.can_generate_images:
            return None
        config = self.engine.model.config
        side = config.num_patches_per_side * config.vq_config.downsampling_factor
        return side, side

    def prepare_images(self, body) -> tuple[ImageGenerationRequest, ImageTask]:
        """Validate an image-generation body and build its task."""
        request = parse_request(ImageGenerationRequest, body)
        self.check_model(request.model)
        engine, limits = self.engine, self.limits
        if not engine.can_generate_images:
            raise ApiError(400, "this model cannot generate images (only Janus checkpoints with generation weights "
                                "can); use /v1/chat/completions")
        if request.response_format not in (None, "b64_json"):
            raise ApiError(400, f"response_format {shown_value(request.response_format)} is not supported: this server "
                                f"returns images inline only; use response_format='b64_json'")
        width, height = self.image_size
        if request.size not in (None, "auto", f"{width}x{height}"):
            raise ApiError(400, f"size {shown_value(request.size)} is not available: this model draws {width}x{height} "
                                f"images only; send size='{width}x{height}' or leave it out")
        if request.n > limits.max_n:
            raise ApiError(400, f"n={request.n} is more than this server's limit of {limits.max_n} images per "
                                f"request (--max-n)")
        if not request.prompt.strip():
            raise ApiError(400, "the image prompt is empty")
        mark = getattr(engine.processor, "image_token", None)
        if mark and mark in request.prompt:  # it would ask for an input image, which this endpoint never takes
            raise ApiError(400, f"the image prompt contains the image placeholder token text {mark}, which this "
                                f"endpoint does not take (it draws from text alone); remove it from the prompt")
        self.check_prompt_size([request.prompt], "the image prompt")
        messages = [{"role": "user", "content": [{"type": "text", "text": request.prompt.strip()}]}]
        text = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
        input_ids = engine.processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"]
        context, prompt = engine.model.max_context, int(input_ids.shape[1])
        if prompt + engine.model.num_image_tokens > context:
            raise ApiError(400, f"the prompt ({prompt} tokens) plus the image's {engine.model.num_image_tokens} tokens "
                                f"is more than the model's context of {context} tokens; shorten the prompt")
        config = image_generation_config(
            engine.model.generation_config, do_sample=True, seed=request.seed, guidance_scale=request.guidance_scale,
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        return request, ImageTask(input_ids, config, request.n)

    def images_body(self, request: ImageGenerationRequest, task: ImageTask, outcome: ImageOutcome) -> dict:
        """The images response body, each picture a base64 file of the request's ``output_format``."""
        data = [ImageData(b64_json=encoded_base64(image, request.output_format, request.output_compression))
                for image in outcome.images]
        width, height = self.image_size
        usage = completed_usage(task.prompt_tokens, self.engine.model.num_image_tokens * len(outcome.images))
        return ImagesResponse(data=data, output_format=request.output_format, size=f"{width}x{height}",
                              usage=usage).model_dump(exclude_none=True)

    # --- for callers that simply wait (batch jobs) --------------------------------------------------
    def run(self, scheduler, url: str, body) -> tuple[int, dict]:
        """Run one request to completion: (status code, response or error body). Never raises for bad input."""
        return self.run_many(scheduler, [(url, body)])[0]

    def run_many(self, scheduler, requests: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
        """Run requests together (each is queued as soon as it is prepared, so they share the model's steps);
        returns (status code, body) per request, in order. Bad requests get the server's error body."""
        pending = []
        for url, body in requests:
            try:
                if url == "/v1/chat/completions":
                    request, task = self.prepare_chat(body)
                    respond, tasks = (lambda outcomes, request=request: self.chat_body(request, outcomes[0])), [task]
                elif url == "/v1/completions":
                    request, tasks, echoes = prepare_completion(self, body)
                    respond = (lambda outcomes, request=request, echoes=echoes:
                               completion_body(self.model_name, request, outcomes, echoes))
                elif url == "/v1/images/generations":
                    request, task = self.prepare_images(body)
                    respond, tasks = (lambda outcomes, request=request, task=task:
                                      self.images_body(request, task, outcomes[0])), [task]
                else:
                    raise ApiError(404, f"unknown endpoint {url!r}: use /v1/chat/completions, /v1/completions or "
                                        f"/v1/images/generations", code="unknown_url")
                pending.append((respond, [scheduler.submit(task) for task in tasks]))
            except Exception as err:
                pending.append((api_error(err), None))
        results = []
        for respond, jobs in pending:
            if jobs is None:
                results.append((respond.status, respond.body()))
                continue
            try:
                results.append((200, respond([job.wait() for job in jobs])))
            except Exception as err:
                for job in jobs:  # a completion's other prompts are not worth finishing
                    job.cancel()
                error = api_error(err)
                results.append((error.status, error.body()))
        return results
