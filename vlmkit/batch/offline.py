"""Offline inference from Python in the shape of vLLM's ``LLM``: load once, then answer a list of
conversations (``chat``), continue text prompts as they are (``generate``) or draw images for a list of
prompts (``generate_images``), all batched on the model through the server's request path::

    llm = vlmkit.LLM("/models/janus-pro-1b")
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=64))
    print(outputs[0].outputs[0].text)

Conversations are OpenAI chat messages; images as ``image_url`` parts (http(s) URLs, data: URIs, or
local paths when the LLM was made with ``media_root``), or PIL images (or numpy arrays / tensors) as
vLLM's ``image_pil`` parts; videos as ``video_url`` parts, or frames in memory as ``{"type": "video",
"video": frames}`` parts; a content part that is a plain string is a text part, as in vLLM.
``sampling_params`` is a ``SamplingParams``, a dict of its fields, or a list of either (one per
conversation). Every argument is checked before the model loads or a row runs: a bad one is an
``InputError`` that names it."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from dataclasses import dataclass, field

from ..errors import InputError, VlmkitError
from ..serve.config import ServeConfig, ServeLimits
from .llm_settings import VLLM_SETTINGS, check_load_options, vllm_settings
from .python_inputs import completion_prompt, conversations_of, openai_message, prompt_list
from .rows import BatchRequest, BatchWorker, check_concurrency, derived_seed


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, -100 to 100

    def request_fields(self) -> dict:
        """These settings as chat-completion request fields (the server checks them as a request's)."""
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=_top_k(self.top_k),
                      seed=self.seed, stop=self.stop, repetition_penalty=self.repetition_penalty,
                      ignore_eos=self.ignore_eos, min_p=self.min_p, min_tokens=self.min_tokens,
                      stop_token_ids=self.stop_token_ids, structured_outputs=self.structured_outputs,
                      allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, logit_bias=_string_keys(self.logit_bias))
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
        """``settings`` are ``ServeConfig`` fields, and vLLM's ``LLM`` settings that vlmkit honours
        (``vllm_settings``: ``seed``, ``limit_mm_per_prompt``, ``tensor_parallel_size=1``, ...)."""
        # everything is checked here, before Engine.load spends seconds to minutes on the weights
        if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
            raise InputError(f"model must be a checkpoint folder or a cached hub id, got {model!r}")
        check_concurrency(concurrency)
        seed, limits = vllm_settings(settings, limits)
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise InputError(f"unknown LLM setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(_SETTINGS | set(VLLM_SETTINGS)))}")
        limits = _serve_limits(limits)
        check_load_options(dtype, device, settings.get("quantize"))
        config = ServeConfig(model=str(model), dtype=dtype, device=device, limits=limits,
                             media_root=_media_root(media_root), **settings)
        self.worker = BatchWorker.load(config, concurrency)
        self.seed = seed
        self._closed = False

    @classmethod
    def from_engine(cls, engine, config: ServeConfig | None = None, concurrency: int = 32) -> "LLM":
        """An LLM over an already loaded ``Engine``."""
        check_concurrency(concurrency)
        llm = cls.__new__(cls)
        llm.worker = BatchWorker(engine, config or ServeConfig(model="model"), concurrency)
        llm.seed = None
        llm._closed = False
        return llm

    def chat(self, messages, sampling_params: SamplingParams | dict | list[SamplingParams | dict] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[ChatOutput]:
        """Answer one conversation (a list of messages) or many (a list of such lists), in order; the chat
        template options mean what they mean in vLLM's ``LLM.chat``. Raises ``InputError`` with the server's
        message for the first conversation that cannot be answered."""
        self._check_open()
        conversations = conversations_of(messages)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(conversations)
        if len(params) != len(conversations):
            raise InputError(f"{len(params)} sampling_params for {len(conversations)} conversations; give one, or one "
                             f"per conversation")
        params = [_sampling_params(p) for p in params]
        template = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                        chat_template_kwargs=chat_template_kwargs)
        bodies = [{"messages": [openai_message(m, f"conversation {c}, message {i}")
                                for i, m in enumerate(conversation)],
                   **p.request_fields(), **template} for c, (conversation, p) in enumerate(zip(conversations, params))]
        outputs = []
        for index, body in enumerate(self._run("/v1/chat/completions", bodies, "conversation", use_tqdm)):
            choices = [CompletionOutput(c["index"], c["message"]["content"], c["finish_reason"])
                       for c in body["choices"]]
            outputs.append(ChatOutput(index, choices, body["usage"]["prompt_tokens"],
                                      body["usage"]["completion_tokens"], body))
        return outputs

    def generate(self, prompts, sampling_params: SamplingParams | dict | list[SamplingParams | dict] | None = None, *,
                 use_tqdm: bool = True) -> list[ChatOutput]:
        """Continue each prompt as it is, with no chat template (vLLM's ``LLM.generate``, the server's
        ``/v1/completions``): a text, a list of texts, ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``.
        ``{"prompt": text, "multi_modal_data": {"image": image_or_list}}`` (vLLM's raw multimodal form) gives
        the text images (PIL, numpy arrays, tensors, or URLs), one per placeholder of the family's processor
        (``<image>``, Janus' ``<image_placeholder>``), expanded as transformers' processor expands that text;
        ``"video"`` (LLaVA-OneVision, one per ``<video>``) is a URL, or frames in memory (a uint8 array or tensor
        [frames, height, width, 3], or a list of frames), used as given, as transformers' processor uses them.
        One output per prompt, in order; ``sampling_params`` as for ``chat``."""
        self._check_open()
        prompts = [completion_prompt(p, i) for i, p in enumerate(prompt_list(prompts))]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(params)} sampling_params for {len(prompts)} prompts; give one, or one per prompt")
        bodies = [{**prompt, **_sampling_params(p).request_fields()} for prompt, p in zip(prompts, params)]
        outputs = []
        for index, body in enumerate(self._run("/v1/completions", bodies, "prompt", use_tqdm)):
            choices = [CompletionOutput(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]]
            outputs.append(ChatOutput(index, choices, body["usage"]["prompt_tokens"],
                                      body["usage"]["completion_tokens"], body))
        return outputs

    def generate_images(self, prompts: str | list[str], *, n: int = 1, seed: int | None = None,
                        guidance_scale: float | None = None, temperature: float | None = None, top_k: int = 0,
                        top_p: float = 1.0, use_tqdm: bool = True) -> list[list]:
        """``n`` PIL images per prompt (Janus), in order; ``seed`` makes each prompt's images repeatable.
        ``guidance_scale`` and ``temperature`` default to the checkpoint's generation_config.json, as for
        ``vlmkit imagine`` and the server."""
        from PIL import Image

        self._check_open()
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            shown = prompts if not isinstance(prompts, (list, tuple)) else \
                next(p for p in prompts if not isinstance(p, str))
            raise InputError(f"generate_images takes a prompt (str) or a list of prompts, got "
                             f"{type(shown).__name__} {shown!r:.60}")
        prompts = list(prompts)
        given = {name: value for name, value in (("guidance_scale", guidance_scale), ("temperature", temperature))
                 if value is not None}  # the others are left out: the server takes the checkpoint's
        bodies = [dict(prompt=prompt, n=n, seed=seed, top_k=top_k, top_p=top_p, **given) for prompt in prompts]
        results = self._run("/v1/images/generations", bodies, "prompt", use_tqdm)
        return [[Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB") for item in body["data"]]
                for body in results]

    def close(self) -> None:
        """Stop the model's worker thread; later calls to ``chat`` or ``generate_images`` are an ``InputError``."""
        if not self._closed:
            self._closed = True
            self.worker.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this LLM is closed (close() was called, or its with-block ended); make a new LLM")

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, url: str, bodies: list[dict], what: str, use_tqdm: bool) -> list[dict]:
        from tqdm import tqdm

        if self.seed is not None:  # vLLM's LLM(seed=): repeatable runs, yet each prompt draws its own tokens
            bodies = [{**body, "seed": derived_seed(f"{self.seed}:{i}")} if body.get("seed") is None else body
                      for i, body in enumerate(bodies)]
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


def _top_k(top_k) -> int:
    """vLLM's top_k as the request's: 0 or -1 (vLLM's older spelling) is off, else a whole number of at least 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise InputError(f"top_k must be 0 (or -1) for no top-k filter, or a whole number of at least 1, got "
                         f"{top_k!r}")
    return max(top_k, 0)


def _string_keys(logit_bias):
    """vLLM's ``{token_id: bias}`` as OpenAI's request writes it, the ids as strings (other keys as they are,
    for the request's check to name)."""
    if not isinstance(logit_bias, dict):
        return logit_bias
    return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in logit_bias.items()}


_SETTINGS = {f.name for f in dataclasses.fields(ServeConfig)} - {"model", "dtype", "device", "limits", "media_root"}
_LIMITS = [f.name for f in dataclasses.fields(ServeLimits)]
_SAMPLING = [f.name for f in dataclasses.fields(SamplingParams)]


def _serve_limits(limits) -> ServeLimits:
    """``limits`` as ``ServeLimits``: a dict is checked key by key (each a whole number of at least 1)."""
    if limits is None:
        return ServeLimits()
    if isinstance(limits, ServeLimits):
        return limits
    if not isinstance(limits, dict):
        raise InputError(f"limits must be a ServeLimits or a dict of its fields, got {type(limits).__name__}")
    unknown = sorted(set(limits) - set(_LIMITS), key=str)
    if unknown:
        raise InputError(f"unknown limit(s) {', '.join(map(repr, unknown))}; known: {', '.join(_LIMITS)}")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"limits[{name!r}] must be a whole number of at least 1, got {value!r}")
    return ServeLimits(**limits)


def _media_root(media_root) -> str | None:
    """An existing folder (as ``--media-root`` insists), or None."""
    if media_root is None:
        return None
    from argparse import ArgumentTypeError

    from ..cli_args import existing_folder

    if not isinstance(media_root, (str, os.PathLike)) or not str(media_root):
        raise InputError(f"media_root must be a folder path, got {media_root!r}")
    try:
        return existing_folder(os.fspath(media_root))
    except ArgumentTypeError as err:
        raise InputError(f"media_root: {err}") from None


def _sampling_params(params) -> SamplingParams:
    """A ``SamplingParams`` from itself, None (the defaults) or a dict of its fields (as ``SamplingParams(**d)``)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(_SAMPLING), key=str)
        if unknown:
            raise InputError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(_SAMPLING)}")
        return SamplingParams(**params)
    raise InputError(f"sampling_params must be a SamplingParams, a dict of its fields, or a list of them (one per "
                     f"conversation), got {type(params).__name__}")
