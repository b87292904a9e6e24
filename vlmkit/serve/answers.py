"""One chat answer as its tokens arrive (``decoding``'s text rows): its text, held back while it could end
in a stop string or half a character, its logprobs entries, and how it ends (a stop, the token budget, or
a forced tool call, sent whole at its end)."""

from dataclasses import dataclass, field

from .detokenizer import IncrementalText
from .options import tool_calls


class AnswerText:
    """One answer's text as its tokens arrive: what may be sent so far, and whether a stop string ended it.

    Text is held back while it ends in an incomplete UTF-8 character or in what could be the start of
    a stop string, so a streamed answer never shows a stop string or half a character. ``prefix`` is
    what the chat template leaves between its generation prompt and an answer (Janus ends the prompt
    with ``<|Assistant|>:`` and the model writes the space itself, as the first token "ĠAnswer"): it is
    not part of the answer, so it is dropped here, once, for plain and streamed answers alike.
    ``include_stop`` keeps the stop string that ended the answer (vLLM's ``include_stop_str_in_output``);
    ``skip_special_tokens=False`` shows special tokens in the text. Before ``min_tokens`` tokens no stop string
    ends the answer; from then on the text is searched from just before the last unchecked token's text (as
    vLLM's stop check looks at new text and a stop's length before it).

    The work per token does not grow with the answer: the text is decoded incrementally
    (``detokenizer.IncrementalText``), each stop string is searched for only where it could end in the new
    text (text searched before, and final, cannot hold it), and what is held back is found from where it
    started last time (a text that may start a stop string begins no earlier than the last one did)."""

    def __init__(self, tokenizer, stops: list[str], prefix: str = "", include_stop: bool = False,
                 skip_special_tokens: bool = True, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prefix = prefix
        self.include_stop, self.skip_special_tokens = include_stop, skip_special_tokens
        self.min_tokens = min_tokens
        self.decoded = IncrementalText(tokenizer, skip_special_tokens)
        self.text = ""
        self.unchecked_end = 0  # the text before here came while stop strings were held back (min_tokens)
        self.sent = 0
        self.stopped_at: int | None = None
        self.stop_end: int | None = None  # where the stop string that ended the answer ends
        self._stable = 0  # the length of the start of ``text`` that no later token changes
        self._searched = 0  # the start of ``text`` that the last stop check searched, and final
        self._held: list[int] = [0] * len(stops)  # per stop, where held-back text could start, last time

    @property
    def ids(self) -> list[int]:
        return self.decoded.ids

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has now appeared."""
        before = len(self.text)
        self._decode(token)
        if len(self.ids) < self.min_tokens:
            return False
        if len(self.ids) == self.min_tokens:
            self.unchecked_end = before
        hits = []
        for stop in self.stops:
            start = max(0, self.unchecked_end - len(stop), self._searched - len(stop) + 1)
            found = self.text.find(stop, start)
            if found >= 0:
                hits.append((found, found + len(stop)))
        if hits:
            self.stopped_at, self.stop_end = min(hits)
        self._searched = self._stable
        return self.stopped_at is not None

    def _decode(self, token: int) -> None:
        decoded = self.decoded
        old_text, old_stable = self.text, self._stable
        decoded.add(token)
        raw = decoded.text
        self.text = raw.removeprefix(self.prefix)
        # the prefix is dropped or kept for good once the stable text is as long as it
        self._stable = len(self.text) - len(decoded.pending) if len(decoded.stable) >= len(self.prefix) else 0
        if decoded.revised or not self.text.startswith(old_text[:old_stable]):
            self._searched, self._held = 0, [0] * len(self.stops)  # earlier text changed: look at all of it

    @property
    def final(self) -> str:
        if self.stopped_at is None:
            return self.text
        return self.text[:self.stop_end if self.include_stop else self.stopped_at]

    def take_ready(self, finished: bool = False) -> str:
        """The text not sent yet that is safe to send (all of it once ``finished``)."""
        end = len(self.final)
        if not finished:
            end = len(self.text) - _trailing(self.text, "\ufffd")
            end = self._hold_back(end)
        chunk = self.final[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return chunk

    def _hold_back(self, end: int) -> int:
        """Where the text that could start a stop string begins (``end`` if none): the longest end of
        ``text[:end]``, shorter than the longest stop string, that some stop string starts with."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        lowest = end - min(end, longest)
        start = end
        for k, stop in enumerate(self.stops):
            begin = max(lowest, self._held[k])
            held = _start_of(self.text, stop, begin, end)
            self._held[k] = min(held, self._stable)
            start = min(start, held)
        return start


def _start_of(text: str, stop: str, begin: int, end: int) -> int:
    """The first i in [begin, end) where text[i:end] is how ``stop`` starts (``end`` if none)."""
    i = text.find(stop[0], begin, end) if stop else -1
    while i >= 0:
        if end - i <= len(stop) and stop.startswith(text[i:end]):
            return i
        i = text.find(stop[0], i + 1, end)
    return end


def _trailing(text: str, char: str) -> int:
    """How many times ``char`` ends ``text``."""
    count = 0
    while count < len(text) and text[-1 - count] == char:
        count += 1
    return count


@dataclass
class TextRow:
    """One choice of one chat request."""

    job: object
    index: int
    answer: AnswerText
    tokens: list[int] = field(default_factory=list)  # every token drawn, the end-of-sequence one included
    logprobs: list[dict] | None = None  # OpenAI's logprobs entries of the answer's tokens (when asked for)
    unsent: int = 0  # logprobs entries not yet sent with a streamed chunk

    def take(self, token: int, eos: set[int], logprob: dict | None = None) -> bool:
        """Record the drawn token (and its logprobs entry) and report what is ready; False once this
        choice has finished."""
        task = self.job.task
        self.tokens.append(token)
        reason = None
        if token in eos and (not task.ignore_eos or task.options.constrained):  # a grammar's end is the end
            reason = "stop"
        else:
            if logprob is not None:
                self.logprobs.append(logprob)
            if token not in eos and self.answer.add(token):
                reason = "stop"
            elif token in task.options.stop_token_ids:
                reason = "stop"
            elif len(self.tokens) >= task.max_tokens:
                reason = "length"
        if task.options.tool_call:  # a tool call is sent whole, at its end
            if reason is not None:
                self._end_tool_call(reason)
            return reason is None
        chunk = self.answer.take_ready(finished=reason is not None)
        if chunk:
            self.job.text(self.index, chunk, self._take_logprobs())
        if reason is not None:
            self.job.end_choice(self.index, self.answer.final, reason, len(self.tokens),
                                logprobs=self.logprobs, last_logprobs=self._take_logprobs())
            return False
        return True

    def _take_logprobs(self) -> list[dict] | None:
        if self.logprobs is None:
            return None
        entries, self.unsent = self.logprobs[self.unsent:], len(self.logprobs)
        return entries

    def _end_tool_call(self, reason: str) -> None:
        text = self.answer.final
        calls = tool_calls(self.job.task.options, text) if reason == "stop" else None
        if not calls and text:  # not a whole call (cut off by max_tokens): the text as it is
            self.job.text(self.index, text)
        self.job.end_choice(self.index, "" if calls else text, "tool_calls" if calls else reason,
                            len(self.tokens), logprobs=self.logprobs, last_logprobs=self._take_logprobs(),
                            tool_calls=calls)
