"""An answer's text decoded a few tokens at a time, as vLLM's incremental detokenizer does, so the cost of
each new token does not grow with the answer (decoding the whole answer at every token is quadratic:
~0.3 ms per row per step at 4,000 tokens).

Each step decodes two short windows that start at the same token: the tokens already in the text since
the last commit, and the same plus the tokens not yet in it; the difference is the new text. Starting
both windows at the same token makes decoder rules that look at neighbours (byte-level merging, a
SentencePiece ``Strip`` of the very first space) act on both alike. A window that does not start the
answer is decoded after an *anchor*, one plain-character token, so rules that apply only to the start of
a text (stripping a leading space) hit the anchor, never the window, as they never hit those tokens in
the whole text. New text that ends in U+FFFD is an incomplete UTF-8 character: it stays ``pending`` (and
its tokens in the next window) until a later token completes it, as whole-text decoding shows it
meanwhile. Should a token change text before it (a tokenizer's clean-up of spaces), the answer is
decoded whole once and ``revised`` says so. ``tests/test_serve_hardening.py`` keeps the text equal to
whole-text decoding."""

import weakref
from collections import deque

LOOKBACK = 8  # tokens before the new ones that each step decodes again, to see changes to their text


class IncrementalText:
    """The text of a growing token sequence: ``stable`` (final) + ``pending`` (an incomplete character)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.stable = ""  # the text of ids[:read_offset]; never changes but by a revision
        self.pending = ""  # the text of ids[read_offset:]: empty, or ending in an incomplete character
        self.prefix_offset = 0  # the first token of both windows
        self.read_offset: int | None = 0  # the first token whose text is not in ``stable`` (None: decode whole)
        self._starts: deque[int] = deque([0])  # where windows may start: the text ends in a whole character
        self.revised = False  # the last token changed ``stable`` (it was decoded whole again)
        self.anchor, self.anchor_text = anchor_of(tokenizer, skip_special_tokens)

    @property
    def text(self) -> str:
        return self.stable + self.pending

    def add(self, token: int) -> None:
        """Append ``token`` and bring ``stable`` and ``pending`` up to date."""
        self.ids.append(token)
        self.revised = False
        if self.read_offset is None:  # since a revision, until the text ends in a whole character again
            self._decode_whole()
            return
        known = self._window(self.read_offset)
        grown = self._window(len(self.ids))
        if known is None or grown is None or not grown.startswith(known):
            self._decode_whole()
            return
        new = grown[len(known):]
        if new.endswith("\ufffd"):  # an incomplete character: wait for the tokens that complete it
            self.pending = new
            return
        self.stable += new
        self.pending = ""
        self._commit()

    def _commit(self) -> None:
        """Every token is in ``stable`` and it ends in a whole character: the next window may start here.
        Windows start up to ``LOOKBACK`` tokens further back, at an earlier such point, so a token that
        changes the text of the few tokens before it is seen (and the answer decoded whole)."""
        self.read_offset = len(self.ids)
        self._starts.append(self.read_offset)
        while len(self._starts) > 1 and self._starts[1] <= self.read_offset - LOOKBACK:
            self._starts.popleft()
        self.prefix_offset = self._starts[0]

    def _window(self, end: int) -> str | None:
        """The text ids[prefix_offset:end] add to the whole text (None if the anchor does not hold)."""
        ids = self.ids[self.prefix_offset:end]
        if self.prefix_offset == 0 or self.anchor is None:
            return self._decode(ids)
        text = self._decode([self.anchor, *ids])
        return text[len(self.anchor_text):] if text.startswith(self.anchor_text) else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_whole(self) -> None:
        """Decode the whole answer (rare: a token changed the text before it). While it ends in an
        incomplete character, all of it is ``pending`` and each token decodes it whole again: where that
        character starts is not known (byte-fallback vocabularies turn a run of bytes that is not UTF-8
        into U+FFFD byte by byte, the run's earlier characters too)."""
        whole = self._decode(self.ids)
        self.revised = True
        if whole.endswith("\ufffd"):
            self.stable, self.pending, self.read_offset = "", whole, None
            return
        self.stable, self.pending = whole, ""
        self._commit()


# each tokenizer's anchors, found once (a server makes an IncrementalText for every choice of every request)
_ANCHORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def anchor_of(tokenizer, skip_special_tokens: bool) -> tuple[int | None, str]:
    """``tokenizer``'s anchor (see ``_find_anchor``), remembered while the tokenizer lives."""
    try:
        found = _ANCHORS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: look each time
        return _find_anchor(tokenizer, skip_special_tokens)
    if skip_special_tokens not in found:
        found[skip_special_tokens] = _find_anchor(tokenizer, skip_special_tokens)
    return found[skip_special_tokens]


def _find_anchor(tokenizer, skip_special_tokens: bool) -> tuple[int | None, str]:
    """A token that decodes to one plain character alone and before others (None if the vocabulary has
    none of the candidates: windows are then decoded as they are, as vLLM does)."""
    token_id = getattr(tokenizer, "token_id", None)
    for char in "a0x!":
        anchor = token_id(char) if token_id is not None else None
        if anchor is None:
            continue
        try:
            alone = tokenizer.decode([anchor], skip_special_tokens=skip_special_tokens)
            twice = tokenizer.decode([anchor, anchor], skip_special_tokens=skip_special_tokens)
        except Exception:  # a tokenizer that cannot decode it: try the next
            continue
        if alone == char and twice == char * 2:
            return anchor, alone
    return None, ""
