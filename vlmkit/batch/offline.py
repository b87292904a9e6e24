"""Offline inference from Python in the shape of vLLM's ``LLM``: load once, then answer a list of
conversations (``chat``) or draw images for a list of prompts (``generate_images``), all batched on
the model through the server's request path::

    llm = vlmkit.LLM("/models/janus-pro-1b")
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=64))
    print(outputs[0].outputs[0].text)

Conversations are OpenAI chat messages; images as ``image_url`` parts (http(s) URLs, data: URIs, or
local paths when the LLM was made with ``media_root``), or PIL images as vLLM's ``image_pil`` parts."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

from ..errors import InputError, VlmkitError
from ..serve.config import ServeConfig, ServeLimits
from .rows import BatchRequest, BatchWorker


@dataclass
class SamplingParams:
    """How to answer, with vLLM's names and defaults: ``temperature`` 0 is greedy; ``top_k`` 0 or -1 is
    off; ``seed`` makes sampling repeatable whatever else shares the batch."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    structured_outputs: dict | None = None  # {"json": schema} / {"regex": ...} / {"choice": [...]} / {"grammar": ...}
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def request_fields(self) -> dict:
        """These settings as chat-completion request fields."""
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                      seed=self.seed, stop=self.stop, repetition_penalty=self.repetition_penalty,
                      ignore_eos=self.ignore_eos, min_p=self.min_p, min_tokens=self.min_tokens,
                      stop_token_ids=self.stop_token_ids, structured_outputs=self.structured_outputs,
                      allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens)
        if self.max_tokens is not None:
            fields["max_tokens"] = self.max_tokens
        return fields


@dataclass
class CompletionOutput:
    """One answer of a conversation (one of its ``n``)."""

    index: int
    text: str
    finish_reason: str


@dataclass
class ChatOutput:
    """A conversation's answers, as vLLM's ``RequestOutput``: ``outputs[i].text``."""

    index: int
    outputs: list[CompletionOutput]
    prompt_tokens: int
    completion_tokens: int
    body: dict = field(repr=False)  # the chat.completion body the server would send

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLM:
    """A model loaded for offline batches (see the module docstring). ``concurrency`` conversations are
    in flight at once; the other settings are ``vlmkit serve``'s (``ServeConfig`` fields, ``limits`` a
    ``ServeLimits`` or a dict of its fields)."""

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, concurrency: int = 32,
                 limits: ServeLimits | dict | None = None, media_root: str | None = None, **settings):
        if isinstance(limits, dict):
            limits = ServeLimits(**limits)
        config = ServeConfig(model=str(model), dtype=dtype, device=device, limits=limits or ServeLimits(),
                             media_root=media_root, **settings)
        self.worker = BatchWorker.load(config, concurrency)

    @classmethod
    def from_engine(cls, engine, config: ServeConfig | None = None, concurrency: int = 32) -> "LLM":
        """An LLM over an already loaded ``Engine``."""
        llm = cls.__new__(cls)
        llm.worker = BatchWorker(engine, config or ServeConfig(model="model"), concurrency)
        return llm

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[ChatOutput]:
        """Answer one conversation (a list of messages) or many (a list of such lists), in order; the chat
        template options mean what they mean in vLLM's ``LLM.chat``. Raises ``InputError`` with the server's
        message for the first conversation that cannot be answered."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(conversations)
        if len(params) != len(conversations):
            raise InputError(f"{len(params)} sampling_params for {len(conversations)} conversations; give one, or one "
                             f"per conversation")
        template = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                        chat_template_kwargs=chat_template_kwargs)
        bodies = [{"messages": [_openai_message(m) for m in conversation], **(p or SamplingParams()).request_fields(),
                   **template} for conversation, p in zip(conversations, params)]
        outputs = []
        for index, body in enumerate(self._run("/v1/chat/completions", bodies, "conversation", use_tqdm)):
            choices = [CompletionOutput(c["index"], c["message"]["content"], c["finish_reason"])
                       for c in body["choices"]]
            outputs.append(ChatOutput(index, choices, body["usage"]["prompt_tokens"],
                                      body["usage"]["completion_tokens"], body))
        return outputs

    def generate_images(self, prompts: str | list[str], *, n: int = 1, seed: int | None = None,
                        guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        use_tqdm: bool = True) -> list[list]:
        """``n`` PIL images per prompt (Janus), in order; ``seed`` makes each prompt's images repeatable."""
        from PIL import Image

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bodies = [dict(prompt=prompt, n=n, seed=seed, guidance_scale=guidance_scale, temperature=temperature,
                       top_k=top_k, top_p=top_p) for prompt in prompts]
        results = self._run("/v1/images/generations", bodies, "prompt", use_tqdm)
        return [[Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB") for item in body["data"]]
                for body in results]

    def close(self) -> None:
        """Stop the model's worker thread."""
        self.worker.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, url: str, bodies: list[dict], what: str, use_tqdm: bool) -> list[dict]:
        from tqdm import tqdm

        requests = [BatchRequest(None, "POST", url, body) for body in bodies]
        index = {id(request): i for i, request in enumerate(requests)}
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), unit=what, disable=not use_tqdm, dynamic_ncols=True) as bar:
            for request, status, body in self.worker.run(requests):
                results[index[id(request)]] = (status, body)
                bar.update(1)
        for i, (status, body) in enumerate(results):
            if status != 200:
                error = InputError if 400 <= status < 500 else VlmkitError
                raise error(f"{what} {i}: {body['error']['message']}")
        return [body for _, body in results]


def _openai_message(message: dict) -> dict:
    """A message with PIL images (vLLM's ``image_pil`` parts, or ``image`` parts holding a PIL image)
    turned into ``image_url`` parts with a PNG data URI, the form the request path takes."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image = part.get("image_pil") if part.get("type") == "image_pil" else \
            part.get("image") if part.get("type") == "image" and not isinstance(part.get("image"), str) else None
        parts.append({"type": "image_url", "image_url": {"url": _png_data_uri(image)}} if image is not None else part)
    return {**message, "content": parts}


def _png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the model sees the same pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
