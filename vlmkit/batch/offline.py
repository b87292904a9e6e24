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

from ..errors import InputError, MediaError, VlmkitError
from ..serve.config import ServeConfig, ServeLimits
from .rows import BatchRequest, BatchWorker, check_concurrency


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
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
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
        # everything is checked here, before Engine.load spends seconds to minutes on the weights
        if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
            raise InputError(f"model must be a checkpoint folder or a cached hub id, got {model!r}")
        check_concurrency(concurrency)
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise InputError(f"unknown LLM setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_SETTINGS))}")
        config = ServeConfig(model=str(model), dtype=dtype, device=device, limits=_serve_limits(limits),
                             media_root=_media_root(media_root), **settings)
        self.worker = BatchWorker.load(config, concurrency)
        self._closed = False

    @classmethod
    def from_engine(cls, engine, config: ServeConfig | None = None, concurrency: int = 32) -> "LLM":
        """An LLM over an already loaded ``Engine``."""
        check_concurrency(concurrency)
        llm = cls.__new__(cls)
        llm.worker = BatchWorker(engine, config or ServeConfig(model="model"), concurrency)
        llm._closed = False
        return llm

    def chat(self, messages, sampling_params: SamplingParams | dict | list[SamplingParams | dict] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[ChatOutput]:
        """Answer one conversation (a list of messages) or many (a list of such lists), in order; the chat
        template options mean what they mean in vLLM's ``LLM.chat``. Raises ``InputError`` with the server's
        message for the first conversation that cannot be answered."""
        self._check_open()
        conversations = _conversations(messages)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(conversations)
        if len(params) != len(conversations):
            raise InputError(f"{len(params)} sampling_params for {len(conversations)} conversations; give one, or one "
                             f"per conversation")
        params = [_sampling_params(p) for p in params]
        template = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                        chat_template_kwargs=chat_template_kwargs)
        bodies = [{"messages": [_openai_message(m, f"conversation {c}, message {i}")
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
        prompts = [_completion_prompt(p, i) for i, p in enumerate(_prompt_list(prompts))]
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


def _string_keys(logit_bias):
    """vLLM's ``{token_id: bias}`` as OpenAI's request writes it, the ids as strings (other keys as they are,
    for the request's check to name)."""
    if not isinstance(logit_bias, dict):
        return logit_bias
    return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in logit_bias.items()}


_SETTINGS = {f.name for f in dataclasses.fields(ServeConfig)} - {"model", "dtype", "device", "limits", "media_root"}
_LIMITS = [f.name for f in dataclasses.fields(ServeLimits)]
_SAMPLING = [f.name for f in dataclasses.fields(SamplingParams)]
_CHAT_TAKES = ("chat takes a conversation (a list of messages such as {'role': 'user', 'content': 'Hi'}) or a "
               "list of conversations")


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


def _prompt_list(prompts) -> list:
    """One prompt (a text or a dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts)
    raise InputError(f"generate takes a prompt (a text, {{'prompt': text}} or {{'prompt_token_ids': ids}}) or a "
                     f"non-empty list of them, got {type(prompts).__name__} {prompts!r:.60}")


def _completion_prompt(prompt, index: int) -> dict:
    """A prompt as ``/v1/completions`` takes it: ``prompt`` (a text or token ids), with a text's
    ``multi_modal_data`` as URLs."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}, key=str)
        if unknown or len(set(prompt) & {"prompt", "prompt_token_ids"}) != 1:
            raise InputError(f"prompt {index}: a prompt dict holds 'prompt' (a text) or 'prompt_token_ids' (token "
                             f"ids), one of them, and for a text its 'multi_modal_data'; got the keys "
                             f"{sorted(prompt, key=str)}")
        value = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if "multi_modal_data" in prompt and "prompt" not in prompt:
            raise InputError(f"prompt {index}: multi_modal_data goes with a text 'prompt', whose placeholders the "
                             f"processor expands into the images' tokens; token ids cannot place images")
        if "prompt" in prompt and isinstance(value, str):
            if "multi_modal_data" in prompt:
                return {"prompt": value,
                        "multi_modal_data": _multi_modal_data(prompt["multi_modal_data"], f"prompt {index}")}
            return {"prompt": value}
        if "prompt_token_ids" in prompt and isinstance(value, (list, tuple)) and value and \
                all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            return {"prompt": list(value)}
        raise InputError(f"prompt {index}: 'prompt' must be a text and 'prompt_token_ids' a non-empty list of token "
                         f"ids, got {value!r:.60}")
    raise InputError(f"prompt {index} is a {type(prompt).__name__}; a prompt is a text, {{'prompt': text}} or "
                     f"{{'prompt_token_ids': ids}}")


def _multi_modal_data(data, where: str) -> dict:
    """vLLM's ``multi_modal_data`` as the server's: each image a URL (in-memory images as PNG data URIs), each
    video a URL or local path (``{"url", "num_frames"}`` to choose the frames sampled), or its frames in memory
    (sent as a lossless .npy data URI: `_frames_data_uri`)."""
    if not isinstance(data, dict) or not data or set(data) - {"image", "video"}:
        got = sorted(data, key=str) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{where}: multi_modal_data must be a dict {{'image': image or list of images}} (and "
                         f"'video' for LLaVA-OneVision), got {got}")
    sent = {}
    for kind, items in data.items():
        if kind == "video" and _is_frame_list(items):
            items = [items]  # one video's frames, as transformers' make_batched_videos reads such a list
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        if not items:
            raise InputError(f"{where}: multi_modal_data[{kind!r}] is empty; give one, or leave it out")
        if kind == "image":
            sent[kind] = [os.fspath(image) if isinstance(image, (str, os.PathLike))  # a URL, or a path with media_root
                          else _png_data_uri(image, f"{where}, multi_modal_data['image'][{k}]", "multi_modal_data")
                          for k, image in enumerate(items)]
        else:
            sent[kind] = [_video_url(video, f"{where}, multi_modal_data['video'][{k}]") for k, video in enumerate(items)]
    return sent


def _is_frame_list(value) -> bool:
    """Whether a list is one video's frames (PIL images, or 3-D arrays or tensors) rather than a list of videos."""
    import numpy as np
    from PIL import Image

    from ..io.media import is_tensor

    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(item, Image.Image) or ((isinstance(item, np.ndarray) or is_tensor(item)) and item.ndim == 3)
        for item in value)


def _video_url(video, where: str):
    """A video as the server's ``video_url``: a URL or path as it is, frames in memory as a data: URI, and in
    ``{"url", "num_frames"}`` the same for its ``url``."""
    if isinstance(video, dict):
        return {**video, "url": _video_url(video["url"], where)} if "url" in video else video  # the server names it
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)  # a URL, or a path with media_root
    return _frames_data_uri(video, where)


def _frames_data_uri(frames, where: str) -> str:
    """Video frames held in memory (a uint8 array or tensor [frames, height, width, 3], or a list of frames) as a
    lossless ``data:application/x-npy`` URI, which the server reads back bit-exactly."""
    import numpy as np

    from ..io.media import is_tensor
    from ..io.video import frames_data_uri

    if not (isinstance(frames, (np.ndarray, list, tuple)) or is_tensor(frames)):
        raise InputError(f"{where}: a video is its URL or file path (make the LLM with media_root), or its frames: a "
                         f"uint8 numpy array or tensor [frames, height, width, 3] or a list of frames; got "
                         f"{type(frames).__name__}")
    try:
        return frames_data_uri(frames)
    except MediaError as err:
        raise InputError(f"{where}: {err}") from None


def _conversations(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or many (a list of such lists), as a list of conversations."""
    if isinstance(messages, dict):
        raise InputError(f"{_CHAT_TAKES}, got one message (a dict); wrap it in a list: [message]")
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        hint = "; for one question, pass [{'role': 'user', 'content': text}]" if isinstance(messages, str) else ""
        raise InputError(f"{_CHAT_TAKES}, got {type(messages).__name__}{hint}")
    messages = list(messages)
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    for c, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)):
            hint = "; for questions, pass [{'role': 'user', 'content': text}] for each" \
                if isinstance(conversation, str) else ""
            raise InputError(f"{_CHAT_TAKES}: conversation {c} is of type {type(conversation).__name__}{hint}")
        for i, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise InputError(f"{_CHAT_TAKES}: conversation {c}, message {i} is of type {type(message).__name__}, "
                                 f"not a dict with 'role' and 'content'")
    return conversations


def _openai_message(message: dict, where: str) -> dict:
    """A message with PIL images (vLLM's ``image_pil`` parts, or ``image`` parts holding a PIL image, array
    or tensor) turned into ``image_url`` parts with a PNG data URI, ``video`` parts holding frames (and an
    optional ``num_frames``) into ``video_url`` parts with a .npy data URI, and plain-string parts into text
    parts (as vLLM's chat parser reads them): the form the request path takes."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for k, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            raise InputError(f"{where}, content part {k} is of type {type(part).__name__}; give a dict such as "
                             f"{{'type': 'text', 'text': ...}} or a string")
        image = part.get("image_pil") if part.get("type") == "image_pil" else \
            part.get("image") if part.get("type") == "image" and not isinstance(part.get("image"), str) else None
        if part.get("type") == "image_pil" and image is None:
            raise InputError(f"{where}, content part {k}: an image_pil part needs its image under 'image_pil'")
        if part.get("type") == "video" and part.get("video") is not None and not isinstance(part["video"], str):
            asked = {"num_frames": part["num_frames"]} if "num_frames" in part else {}
            parts.append({"type": "video_url", "video_url": {
                "url": _frames_data_uri(part["video"], f"{where}, content part {k}"), **asked}})
            continue
        parts.append({"type": "image_url", "image_url": {"url": _png_data_uri(image, f"{where}, content part {k}")}}
                     if image is not None else part)
    return {**message, "content": parts}


def _png_data_uri(image, where: str, taker: str = "an image_pil part") -> str:
    """A PIL image, array or tensor as a PNG data URI; ``taker`` names what takes it in errors."""
    from PIL import Image

    from ..io.media import is_tensor, load_image

    if isinstance(image, (str, os.PathLike)):
        raise InputError(f"{where}: {taker} takes a PIL image (or a numpy array or tensor), not a path "
                         f"({str(image)!r:.80}); open it with PIL.Image.open, or send an image_url part with the "
                         f"path and make the LLM with media_root")
    if not isinstance(image, Image.Image):
        import numpy as np

        if not (isinstance(image, np.ndarray) or is_tensor(image)):
            raise InputError(f"{where}: {taker} takes a PIL image (or a numpy array or tensor), got "
                             f"{type(image).__name__}")
        try:
            image = load_image(image)  # HxW, HxWxC or CxHxW, as the processors take arrays
        except MediaError as err:
            raise InputError(f"{where}: {err}") from None
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")  # lossless: the model sees the same pixels
    except (OSError, ValueError, KeyError):  # a mode PNG cannot hold (CMYK, F): RGB as the processors convert it
        from ..io.media import to_rgb

        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
