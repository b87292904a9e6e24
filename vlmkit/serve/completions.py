"""OpenAI's text completions, ``POST /v1/completions``, as vLLM serves them: a prompt (text, or token ids)
continued as it is, with no chat template, and the ``text_completion`` bodies and stream chunks.

A request may hold several prompts; each becomes a task of its own (its ``n`` choices), and choice ``i`` of
prompt ``p`` is choice ``p * n + i`` of the answer, as in OpenAI's API. The sampling options, their checks
and the decoding are the chat endpoint's. ``logprobs`` is an integer here (how many of the likeliest tokens
to list beside each sampled one, 0 for the sampled token alone) and the entries take the completions
shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``. ``echo`` puts the prompt's
text before each choice's."""

import json
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..errors import InputError
from .events import ChatOutcome, ChoiceEnd, JobEnd, JobFailed, TextDelta
from .options import chat_options
from .schemas import (UNSUPPORTED_VLLM_OPTIONS, ChatCompletionRequest, ChatMessage, Flag, Text, Usage, _int, new_id,
                      parse_request)
from .scheduler import ChatTask

TokenId = _int(ge=0, le=2 ** 31 - 1)

# completions take echo (the prompt's text before each answer); the chat endpoint's other refusals hold
_UNSUPPORTED = {name: neutral for name, neutral in UNSUPPORTED_VLLM_OPTIONS.items() if name != "echo"}


class CompletionRequest(ChatCompletionRequest):
    """``POST /v1/completions``: the chat request's sampling options (vLLM's extras included), a
    ``prompt`` in place of ``messages``, OpenAI's default of 16 tokens, ``logprobs`` as a count (0 to 20),
    ``echo``; no tools, no ``suffix``."""

    messages: list[ChatMessage] | None = None  # not read: a completion continues ``prompt``
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(union_mode="left_to_right")
    max_tokens: _int(ge=1) | None = 16
    logprobs: _int(ge=0, le=20) | None = None
    echo: Flag = False
    suffix: Text | None = None
    add_special_tokens: Flag = True  # vLLM's: the tokenizer's BOS before a text prompt

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_vllm_options(cls, values):
        if isinstance(values, dict):
            for name, neutral in _UNSUPPORTED.items():
                value = values.get(name)
                if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
                    raise ValueError(f"{name}: this vLLM option is not supported by vlmkit's server; leave it out")
        return values

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
        return self

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
    token_ids = [tokenizer(p, add_special_tokens=request.add_special_tokens)["input_ids"] if isinstance(p, str)
                 else p for p in prompts]
    vocabulary = len(tokenizer)
    for i, ids in enumerate(token_ids):
        if not ids:
            raise InputError(f"prompt {i} is empty (no tokens): send some text, or add_special_tokens: true")
        if max(ids) >= vocabulary:
            raise InputError(f"prompt {i} holds token id {max(ids)}, outside the model's vocabulary of {vocabulary} "
                             f"tokens")
    tasks = []
    for ids in token_ids:
        budget = handler.answer_budget(request, len(ids), "the prompt")
        inputs = handler.engine.text_inputs(ids)
        tasks.append(ChatTask(inputs, handler.sampling_config(request, budget), budget, request.n,
                              request.stop_strings, request.ignore_eos, request.include_stop_str_in_output,
                              request.skip_special_tokens, "", replace(options)))
    echoes = [(p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=request.skip_special_tokens))
              if request.echo else "" for p in prompts]
    return request, tasks, echoes


def completion_body(model: str, request: CompletionRequest, outcomes: list[ChatOutcome], echoes: list[str]) -> dict:
    """The ``text_completion`` response body for every prompt's outcome."""
    choices = []
    for prompt_index, (outcome, echo) in enumerate(zip(outcomes, echoes)):
        for choice in outcome.choices:
            choices.append(CompletionChoice(
                index=prompt_index * request.n + choice.index, text=echo + choice.text,
                logprobs=None if choice.logprobs is None else completion_logprobs(choice.logprobs, len(echo)),
                finish_reason=choice.finish_reason))
    prompt_tokens = sum(o.prompt_tokens for o in outcomes)
    completion_tokens = sum(o.completion_tokens for o in outcomes)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
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
                            include_usage: bool, error_body):
    """``text_completion`` server-sent events from ``tagged_events`` ((prompt index, job event) pairs of every
    prompt's job), then ``data: [DONE]``; ``error_body(err)`` is the body of a failed job's error event."""
    chunk_id, created, n = new_id("cmpl"), int(time.time()), request.n

    def event(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": chunk_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    offsets = {}  # each choice's text so far (echo included), where its next token's text starts

    def choice(index: int, text: str, entries: list[dict] | None, finish_reason: str | None) -> dict:
        logprobs = None
        if entries is not None:
            logprobs = completion_logprobs(entries, offsets[index])
            offsets[index] += sum(len(entry["token"]) for entry in entries)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

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
                yield event([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens).model_dump())
            break
        elif isinstance(item, JobFailed):
            yield f"data: {json.dumps(error_body(item.error))}\n\n"
            break
    else:
        return  # the client went away: nothing more to send
    yield "data: [DONE]\n\n"
