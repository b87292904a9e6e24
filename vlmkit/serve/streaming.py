"""A request's side of a job the scheduler runs: its events handed from the worker thread to the request's
event loop, the outcome waited for (the job cancelled if the client goes away first), and a chat answer
streamed as ``chat.completion.chunk`` server-sent events."""

import asyncio
import json

from fastapi import Request

from .api_errors import ApiError, api_error
from .events import ChoiceEnd, JobEnd, JobFailed, TextDelta
from .responses import Usage, chunk_events


def forward_events(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, stream: bool, tag: int | None = None):
    """A job listener that hands events from the worker thread to this request's event loop (only the
    final one unless streaming); with a ``tag`` (a completion's prompt index) each as ``(tag, event)``."""
    def listen(event) -> None:
        if stream or isinstance(event, (JobEnd, JobFailed)):
            loop.call_soon_threadsafe(events.put_nowait, event if tag is None else (tag, event))
    return listen


async def job_events(jobs: list, events: asyncio.Queue, request: Request):
    """The events of ``jobs`` (one, or a completion's one per prompt, sharing ``events``) as they come; if the
    client disconnects first, the jobs are cancelled (their rows leave the batch before the next step) and the
    iteration ends."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return
            yield get.result()
    finally:
        gone.cancel()
        for job in jobs:
            job.cancel()  # no-op once finished


async def job_outcome(job, events: asyncio.Queue, request: Request):
    """Wait for the job's outcome (raising its error)."""
    async for event in job_events([job], events, request):
        if isinstance(event, JobEnd):
            return event.outcome
        if isinstance(event, JobFailed):
            raise event.error
    raise ApiError(499, "the client disconnected", code="client_closed_request")


async def job_outcomes(jobs: list, events: asyncio.Queue, request: Request) -> list:
    """Wait for every job's outcome, in the order of ``jobs`` (raising the first error that comes)."""
    outcomes = [None] * len(jobs)
    async for tag, event in job_events(jobs, events, request):
        if isinstance(event, JobFailed):
            raise event.error
        outcomes[tag] = event.outcome
        if all(outcome is not None for outcome in outcomes):
            return outcomes
    raise ApiError(499, "the client disconnected", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def chat_sse(job, events: asyncio.Queue, request: Request, model: str, n: int, include_usage: bool):
    """``chat.completion.chunk`` server-sent events, then ``data: [DONE]``. Closing the stream early (the
    client went away) cancels the job."""
    event = chunk_events("chat.completion.chunk", model, "chatcmpl")
    stream = job_events([job], events, request)
    try:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(n)])
        async for item in stream:
            if isinstance(item, TextDelta):
                yield event([_chunk_choice(item.index, {"content": item.text}, None, item.logprobs)])
            elif isinstance(item, ChoiceEnd):
                delta = {"tool_calls": [dict(call, index=i) for i, call in enumerate(item.tool_calls)]} \
                    if item.tool_calls else {}
                yield event([_chunk_choice(item.index, delta, item.finish_reason, item.last_logprobs)])
            elif isinstance(item, JobEnd):
                if include_usage:
                    yield event([], Usage.of(item.outcome.prompt_tokens, item.outcome.completion_tokens).model_dump())
                break
            elif isinstance(item, JobFailed):
                yield f"data: {json.dumps(api_error(item.error).body())}\n\n"
                break
        else:
            return  # the client went away: nothing more to send
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()


def _chunk_choice(index: int, delta: dict, finish_reason: str | None, logprobs: list[dict] | None) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return choice

