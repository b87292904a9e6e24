"""OpenAI's text completions, ``POST /v1/completions``, as vLLM serves them: a prompt (text, or token ids)
continued as it is, with no chat template, and the ``text_completion`` bodies and stream chunks.

A request may hold several prompts; each becomes a task of its own (its ``n`` choices), and choice ``i`` of
prompt ``p`` is choice ``p * n + i`` of the answer, as in OpenAI's API. The sampling options, their checks
and the decoding are the chat endpoint's. ``logprobs`` is an integer here (how many of the likeliest tokens
to list beside each sampled one, 0 for the sampled token alone) and the entries take the completions
shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``. ``echo`` puts the prompt's
text before each choice's.

vlmkit's extension ``multi_modal_data`` (vLLM's field of the same name, with URLs for its images) gives a
text prompt images, and videos for LLaVA-OneVision: the prompt, written in the family's raw format, holds one
placeholder per image (``<image_placeholder>`` for Janus, ``<image>`` for LLaVA-OneVision and IDEFICS,
``<video>`` per video), and the family's processor expands each into that image's tokens, as transformers'
processor does for the same text. The media are fetched under the chat endpoint's policy and limits."""

import json
import time
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..errors import InputError
from .api_errors import api_error
from .events import ChatOutcome, ChoiceEnd, JobEnd, JobFailed, TextDelta
from .options import chat_options
from .fields import Flag, RequestModel, Text, json_int, parse_request
from .responses import Usage, chunk_events, new_id
from .schemas import UNSUPPORTED_VLLM_OPTIONS, ChatCompletionRequest, ChatMessage, ImagePart, MediaURL, VideoPart
from .scheduler import ChatTask

TokenId = json_int(ge=0, le=2 ** 31 - 1)

class MultiModalData(RequestModel):
    """``multi_modal_data``: the images (URLs or data: URIs, in the prompt's placeholder order) and videos (URLs,
    or ``{"url", "num_frames"}`` as a chat's ``video_url``) of a text prompt; one URL alone is a list of one."""

    image: list[Text] = []
    video: list[MediaURL | Text] = []

    @model_validator(mode="before")
    @classmethod
    def _known_kinds(cls, values):
        if isinstance(values, dict):
            unknown = sorted(set(values) - {"image", "video"}, key=str)
            if unknown:
                raise ValueError(f"{', '.join(map(repr, unknown))} is not a kind of media vlmkit takes; give 'image' "
                                 f"and/or 'video', each a list of URLs")
        return values

    @field_validator("image", "video", mode="before")
    @classmethod
    def _one_is_a_list(cls, value):
        return [value] if isinstance(value, (str, dict)) else value

    @property
    def parts(self) -> list[tuple[str, ImagePart | VideoPart]]:
        """(where, part) for each image and video, as chat content parts (loaded as a chat's are)."""
        images = [(f"multi_modal_data.image[{i}]", ImagePart(type="image_url", image_url={"url": url}))
                  for i, url in enumerate(self.image)]
        videos = [(f"multi_modal_data.video[{i}]", VideoPart(type="video_url", video_url=video))
                  for i, video in enumerate(self.video)]
        return images + videos


class CompletionRequest(ChatCompletionRequest):
    """``POST /v1/completions``: the chat request's sampling options (vLLM's extras included), a
    ``prompt`` in place of ``messages``, OpenAI's default of 16 tokens, ``logprobs`` as a count (0 to 20),
    ``echo``; no tools, no ``suffix``."""

    messages: list[ChatMessage] | None = None  # not read: a completion continues ``prompt``
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(union_mode="left_to_right")
    max_tokens: json_int(ge=1) | None = 16
    logprobs: json_int(ge=0, le=20) | None = None
    echo: Flag = False
    suffix: Text | None = None
    add_special_tokens: Flag = True  # vLLM's: the tokenizer's BOS before a text prompt
    multi_modal_data: MultiModalData | None = None  # vlmkit's: the images of one text prompt (module docstring)

    # completions take echo (the prompt's text before each answer); the chat endpoint's other refusals hold
    UNSUPPORTED_OPTIONS: ClassVar[dict] = {name: neutral for name, neutral in UNSUPPORTED_VLLM_OPTIONS.items()
                                           if name != "echo"}

    @model_validator(mode="after")
    def _completion_only(self):
        if self.tools or self.tool_choice is not None:
            raise ValueError("tools: a completion does not call tools; send the conversation to /v1/chat/completions")
        if self.suffix:
            raise ValueError("suffix: text after the completion (insertion) is not supported; leave it out")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: with logprobs it would need the prompt's logprobs, which vlmkit does not compute; "
                             "drop one of them")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list; send a string, a list of strings or token ids")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise ValueError("prompt: a token-id prompt is empty")
        if self.multi_modal_data is not None:
            self._check_multi_modal_data()
        return self

    def _check_multi_modal_data(self) -> None:
        # one prompt per request keeps "which image is whose" out of the API; LLM.generate sends one per prompt
        media = self.multi_modal_data
        if not media.image and not media.video:
            raise ValueError("multi_modal_data: holds no image or video; give 'image' (a list of URLs) or leave "
                             "multi_modal_data out")
        if len(self.prompts) > 1:
            raise ValueError(f"multi_modal_data: goes with one text prompt, and the request has {len(self.prompts)} "
                             f"prompts; send each prompt with its images in a request of its own")
        if not isinstance(self.prompts[0], str):
            raise ValueError("multi_modal_data: goes with a text prompt, whose placeholders the processor expands "
                             "into the images' tokens; token ids cannot place images, so send the prompt as text")

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def logprob_view(self) -> "ChatCompletionRequest":
        """The request as ``chat_options`` reads logprobs (``logprobs`` true, ``top_logprobs`` the count)."""
        return self.model_copy(update=dict(logprobs=self.logprobs is not None, top_logprobs=self.logprobs or None))


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None  # tokens, token_logprobs, top_logprobs, text_offset
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def prepare_completion(handler, body) -> tuple[CompletionRequest, list[ChatTask], list[str]]:
    """Check a completions body and build a task per prompt, with the text each choice is echoed after ("" without
    ``echo``). Everything is checked before any task is made."""
    request = parse_request(CompletionRequest, body)
    handler.check_model(request.model)
    prompts = request.prompts
    handler.check_counts(request, len(prompts) * request.n)
    handler.check_prompt_size([p for p in prompts if isinstance(p, str)])
    options = chat_options(request.logprob_view, handler.engine)
    tokenizer = handler.engine.tokenizer

    def task(inputs: dict, shorten: str) -> ChatTask:
        budget = handler.answer_budget(request, int(inputs["input_ids"].shape[1]), shorten)
        return ChatTask(inputs, handler.sampling_config(request, budget), budget, request.n, request.stop_strings,
                        request.ignore_eos, request.include_stop_str_in_output, request.skip_special_tokens, "",
                        replace(options))  # each task's own (its grammar matchers, its logprobs)

    if request.multi_modal_data is not None:
        inputs = _media_inputs(handler, prompts[0], request.multi_modal_data, request.add_special_tokens)
        return request, [task(inputs, "the prompt or send fewer images")], [prompts[0] if request.echo else ""]
    token_ids = [tokenizer(p, add_special_tokens=request.add_special_tokens)["input_ids"] if isinstance(p, str)
                 else p for p in prompts]
    vocabulary = len(tokenizer)
    for i, ids in enumerate(token_ids):
        which = f"prompt {i}" if len(token_ids) > 1 else "the prompt"
        if not ids:
            raise InputError(f"{which} is empty (no tokens): send some text, or add_special_tokens: true")
        if max(ids) >= vocabulary:
            raise InputError(f"{which} holds token id {max(ids)}, outside the model's vocabulary of {vocabulary} "
                             f"tokens")
        _check_no_placeholders(handler.engine, which, ids)
    tasks = [task(handler.engine.text_inputs(ids), "the prompt") for ids in token_ids]
    echoes = [(p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=request.skip_special_tokens))
              if request.echo else "" for p in prompts]
    return request, tasks, echoes


def placeholders(engine) -> dict[str, str]:
    """The text a raw prompt writes where each image (and video) goes: the family processor's placeholder."""
    if engine.model_type == "idefics":
        from ..models.idefics.processing import IMAGE_TOKEN
        return {"image": IMAGE_TOKEN}  # where an image item goes in the processor's interleaved list
    video = getattr(engine.processor, "video_token", None)
    return {"image": engine.processor.image_token, **({"video": video} if video else {})}


def _check_no_placeholders(engine, which: str, ids: list[int]) -> None:
    """A prompt without ``multi_modal_data`` gives no media, so it may hold no media placeholder (as text or as
    its token id): the model would otherwise fail on it under the names of its own inputs."""
    for kind, mark in placeholders(engine).items():
        token = engine.tokenizer.token_id(mark)
        count = ids.count(token) if token is not None else 0
        if count:
            raise InputError(f"{which} holds {count} {kind} placeholder(s) ({mark}) but the request gives no "
                             f"{kind}s; send the {kind}s in multi_modal_data (one per placeholder, in order) or "
                             f"remove the placeholder(s) from the prompt")


def _media_inputs(handler, prompt: str, media: MultiModalData, add_special_tokens: bool) -> dict:
    """Model inputs for a raw text prompt with its images (and videos): the placeholders counted against the
    media before anything is fetched, then the family's processor called as transformers' is."""
    engine = handler.engine
    marks = placeholders(engine)
    for kind, given in (("image", len(media.image)), ("video", len(media.video))):
        mark = marks.get(kind)
        if mark is None:  # video for a family without it: load_media refuses it, naming the family
            continue
        written = prompt.count(mark)
        if written != given:
            raise InputError(f"the prompt holds {written} {kind} placeholder(s) but multi_modal_data has {given} "
                             f"{kind}(s); write {mark} in the prompt where each {kind} goes, one per {kind}")
    blocks = handler.load_media(media.parts)
    images = [block["image"] for block in blocks if block["type"] == "image"]
    videos = [block["video"] for block in blocks if block["type"] == "video"]
    options = {} if add_special_tokens else {"add_special_tokens": False}
    if engine.model_type == "idefics":
        inputs = engine.processor(text=[_interleaved(prompt, marks["image"], images)], **options)
    else:
        inputs = engine.processor(text=prompt, images=images or None, **({"videos": videos} if videos else {}),
                                  **options)
    return inputs.to(engine.model.device, dtype=engine.model.dtype)


def _interleaved(prompt: str, mark: str, images: list) -> list:
    """IDEFICS' prompt form, a list of texts and images: the image at each placeholder. Consecutive images
    keep no empty text between them, so they share a fake token as in the processor's own lists."""
    from ..models.idefics.processing import is_url

    pieces = prompt.split(mark)
    items = [pieces[0]] if pieces[0] else []
    for image, piece in zip(images, pieces[1:]):
        items.append(image)
        if piece:
            items.append(piece)
    for item in items:  # the processor would fetch such a text as an image, outside the server's media policy
        if isinstance(item, str) and is_url(item.strip(" ")):
            raise InputError(f"the prompt text {item.strip()!r:.80} between image placeholders reads as an image URL "
                             f"to IDEFICS' processor; give images in multi_modal_data, or add words around it")
    return items


def completion_body(model: str, request: CompletionRequest, outcomes: list[ChatOutcome], echoes: list[str]) -> dict:
    """The ``text_completion`` response body for every prompt's outcome."""
    choices = []
    for prompt_index, (outcome, echo) in enumerate(zip(outcomes, echoes)):
        for choice in outcome.choices:
            choices.append(CompletionChoice(
                index=prompt_index * request.n + choice.index, text=echo + choice.text,
                logprobs=None if choice.logprobs is None else completion_logprobs(choice.logprobs, len(echo)),
                finish_reason=choice.finish_reason))
    usage = Usage.of(sum(o.prompt_tokens for o in outcomes), sum(o.completion_tokens for o in outcomes))
    return TextCompletion(model=model, choices=choices, usage=usage).model_dump()


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict[str, list[Any]]:
    """OpenAI's chat logprobs entries in the completions shape; ``offset``: where the first token's text starts."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or ()} for e in entries],
            "text_offset": offsets}



async def completion_stream(tagged_events, model: str, request: CompletionRequest, echoes: list[str],
                            include_usage: bool):
    """``text_completion`` server-sent events from ``tagged_events`` ((prompt index, job event) pairs of every
    prompt's job, as ``streaming.job_events`` gives them), then ``data: [DONE]`` (a failed job's error as the chat stream
    sends it). Closing the stream early (the client went away) cancels the jobs."""
    event, n = chunk_events("text_completion", model, "cmpl"), request.n
    offsets = {}  # each choice's text so far (echo included), where its next token's text starts

    def choice(index: int, text: str, entries: list[dict] | None, finish_reason: str | None) -> dict:
        logprobs = None
        if entries is not None:
            logprobs = completion_logprobs(entries, offsets[index])
            offsets[index] += sum(len(entry["token"]) for entry in entries)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    try:
        for prompt_index, echo in enumerate(echoes):
            for index in range(prompt_index * n, (prompt_index + 1) * n):
                offsets[index] = len(echo)
                if echo:
                    yield event([choice(index, echo, None, None)])
        ended, prompt_tokens, completion_tokens = 0, 0, 0
        async for prompt_index, item in tagged_events:
            if isinstance(item, TextDelta):
                yield event([choice(prompt_index * n + item.index, item.text, item.logprobs, None)])
            elif isinstance(item, ChoiceEnd):
                yield event([choice(prompt_index * n + item.index, "", item.last_logprobs, item.finish_reason)])
            elif isinstance(item, JobEnd):
                ended += 1
                prompt_tokens += item.outcome.prompt_tokens
                completion_tokens += item.outcome.completion_tokens
                if ended < len(echoes):
                    continue
                if include_usage:
                    yield event([], Usage.of(prompt_tokens, completion_tokens).model_dump())
                break
            elif isinstance(item, JobFailed):
                yield f"data: {json.dumps(api_error(item.error).body())}\n\n"
                break
        else:
            return  # the client went away: nothing more to send
        yield "data: [DONE]\n\n"
    finally:
        await tagged_events.aclose()  # the jobs are cancelled if the client left before they ended
