"""Streaming decoded text while tokens are generated.

vlmkit's streamers get one ``put(tokens)`` per step. A transformers streamer (``transformers.TextStreamer``,
``TextIteratorStreamer`` or any ``BaseStreamer`` subclass) gets the prompt first, as transformers'
``generate`` sends it (``skip_prompt=True`` relies on that)."""

import queue
import threading
from collections.abc import Callable, Iterator

import torch


class TextStreamer:
    """Receives each step's tokens (``put``) for one sequence and emits new text as it becomes
    stable: a trailing incomplete UTF-8 character is held back until the next token completes it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0

    def put(self, tokens: torch.Tensor) -> None:
        self.tokens.append(int(tokens.reshape(-1)[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.emitted:
            self.on_text(text[self.emitted:])
            self.emitted = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if len(text) > self.emitted:
            self.on_text(text[self.emitted:])
            self.emitted = len(text)


class TextIteratorStreamer(TextStreamer):
    """A streamer you iterate over from another thread: ``for chunk in streamer: ...``."""

    _DONE = object()

    def __init__(self, tokenizer, skip_special_tokens: bool = True, timeout: float | None = None):
        self.chunks: queue.Queue = queue.Queue()
        self.timeout = timeout
        super().__init__(tokenizer, self.chunks.put, skip_special_tokens)

    def end(self) -> None:
        super().end()
        self.chunks.put(self._DONE)

    def __iter__(self) -> Iterator[str]:
        while True:
            chunk = self.chunks.get(timeout=self.timeout)
            if chunk is self._DONE:
                return
            yield chunk


def stream_in_thread(run: Callable[[TextIteratorStreamer], object], tokenizer) -> Iterator[str]:
    """Run ``run(streamer)`` in a thread and yield its text chunks; re-raise its error at the end."""
    streamer = TextIteratorStreamer(tokenizer)
    failure: list[BaseException] = []

    def target():
        try:
            run(streamer)
        except BaseException as err:  # surfaced to the consumer below
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]


def expects_prompt(streamer) -> bool:
    """Whether ``streamer`` follows transformers' protocol (a transformers class or a subclass of one),
    whose first ``put`` is the prompt."""
    return any(cls.__module__.split(".")[0] == "transformers" for cls in type(streamer).__mro__)


def step_callback(streamer, prompt_ids: torch.Tensor) -> Callable[[torch.Tensor], None] | None:
    """What ``generate``'s loop calls with each step's tokens: ``streamer.put``; a transformers streamer
    gets the prompt first and CPU tensors, as transformers sends them."""
    if streamer is None:
        return None
    if not expects_prompt(streamer):
        return streamer.put
    streamer.put(prompt_ids.cpu())
    return lambda tokens: streamer.put(tokens.cpu())
