"""Streaming decoded text while tokens are generated, with transformers' streamer protocol: ``generate``
calls ``put(prompt_ids)`` once, then ``put(tokens)`` each step, then ``end()``; so transformers' own
streamers (``TextStreamer``, ``TextIteratorStreamer``, any ``BaseStreamer``) work here, and vlmkit's take
transformers' arguments (``skip_prompt``, decode options such as ``skip_special_tokens``)."""

import queue
from collections.abc import Callable, Iterator

import torch


class TextStreamer:
    """Prints the text as it is generated (or hands it to ``on_text``), the prompt too unless
    ``skip_prompt``; ``decode_kwargs`` go to ``tokenizer.decode`` (``skip_special_tokens=True`` to leave
    special tokens out). A trailing incomplete UTF-8 character is held back until the next token completes it."""

    def __init__(self, tokenizer, skip_prompt: bool = False, *, on_text: Callable[[str], None] | None = None,
                 **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.on_text = on_text
        self.decode_kwargs = decode_kwargs
        self.tokens: list[int] = []
        self.emitted = 0
        self.next_is_prompt = True

    def put(self, tokens: torch.Tensor) -> None:
        is_prompt, self.next_is_prompt = self.next_is_prompt, False
        if is_prompt and self.skip_prompt:
            return
        # the first sequence of a batch: its prompt row, then each step's first token
        tokens = tokens[0] if tokens.dim() > 1 else tokens.reshape(-1) if is_prompt else tokens.reshape(-1)[:1]
        self.tokens.extend(int(t) for t in tokens)
        text = self.tokenizer.decode(self.tokens, **self.decode_kwargs)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.tokens, **self.decode_kwargs), final=True)
        self.tokens, self.emitted, self.next_is_prompt = [], 0, True  # ready for another generate call

    def _emit(self, text: str, final: bool = False) -> None:
        if len(text) > self.emitted or final:
            self.on_finalized_text(text[self.emitted:], stream_end=final)
            self.emitted = len(text)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """New text (transformers' hook of the same name): to ``on_text``, else printed."""
        if self.on_text is not None:
            if text:
                self.on_text(text)
        else:
            print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A streamer you iterate over from another thread: ``for chunk in streamer: ...`` (transformers'
    arguments: ``skip_prompt``, ``timeout`` for each chunk, decode options)."""

    _DONE = object()

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.chunks: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.chunks.put(text)
        if stream_end:
            self.chunks.put(self._DONE)

    def __iter__(self) -> Iterator[str]:
        while True:
            chunk = self.chunks.get(timeout=self.timeout)
            if chunk is self._DONE:
                return
            yield chunk


def step_callback(streamer, prompt_ids: torch.Tensor) -> Callable[[torch.Tensor], None] | None:
    """What ``generate``'s loop calls with each step's tokens: ``streamer.put``, after the prompt, with CPU
    tensors, as transformers sends them."""
    if streamer is None:
        return None
    streamer.put(prompt_ids.cpu())
    return lambda tokens: streamer.put(tokens.cpu())
