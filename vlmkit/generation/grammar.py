"""Grammars for constrained decoding: a JSON Schema, a regular expression, a list of choices or a Lark/GBNF
grammar compiled once into a matcher that, step by step, says which tokens may come next (the server's
``response_format``, forced tool calls and vLLM's ``structured_outputs``).

The engine is llguidance rather than xgrammar: it builds its token table straight from a ``tokenizers``
JSON (the tokenizer vlmkit already holds, no transformers import), computes each step's mask lazily
from an Earley parser in tens of microseconds without precompiling every schema against the whole
vocabulary, and brings no torch or CUDA build of its own, so it installs beside any torch. The mask it
fills is a [rows, ceil(V / 32)] int32 bitmask; ``GrammarConstraint`` (below) applies it to the scores
with torch ops, so it works on CPU and CUDA alike."""

import functools
import json
import logging
import threading

import numpy as np
import torch

from ..errors import InputError
from .schema_refs import unending_ref

_lock = threading.Lock()
log = logging.getLogger("vlmkit.grammar")


def _llguidance():
    try:
        import llguidance
    except ImportError:  # an optional dependency (the serve extra)
        raise InputError("constrained decoding and logprobs need llguidance: pip install 'vlmkit[serve]'") from None
    return llguidance


class GrammarTokenizer:
    """llguidance's view of a model's vocabulary: built once per tokenizer (about a second for 100k
    tokens), shared by every grammar compiled for it. ``vocab_size`` is the width of the model's scores
    (it may exceed the tokenizer's entries; the extra ids are never allowed)."""

    def __init__(self, backend, vocab_size: int, eos_token_ids):
        llguidance = _llguidance()
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                eos_token=self.eos_token_ids)
        self._matchers: dict[str, object] = {}

    def json_matcher(self, schema: dict | bool | None):
        """A fresh matcher for JSON text valid under ``schema`` (None: any JSON object). A schema llguidance
        cannot compile is an ``InputError`` naming why."""
        return self.matcher(*json_constraint(schema))

    def matcher(self, kind: str, source: str):
        """A fresh matcher for text that ``source`` describes: ``kind`` "json" (a JSON Schema's text), "regex"
        (the whole answer matches it), "choice" (a JSON list of the strings the answer may be) or "grammar"
        (a context-free grammar in Lark or GBNF syntax, as vLLM's guidance backend takes it). Each grammar is
        compiled once and kept; each call returns a copy at its start. One that cannot be compiled is an
        ``InputError`` naming why."""
        key = (kind, source)
        with _lock:
            compiled = self._matchers.get(key)
            if compiled is None:
                compiled = self._compile(kind, source)
                if len(self._matchers) >= 256:  # a bounded cache: the oldest grammar goes first
                    self._matchers.pop(next(iter(self._matchers)))
                self._matchers[key] = compiled
            return compiled.deep_copy()

    def _compile(self, kind: str, source: str):
        llguidance = _llguidance()
        what = _GRAMMAR_NAMES[kind]
        if kind == "json":
            if source == "false":
                raise InputError("the JSON Schema false allows no value at all; give a schema an answer can follow")
            check_refs_end(json.loads(source))
        try:
            grammar = _grammar_text(llguidance, kind, source)
        except (ValueError, TypeError) as err:
            raise InputError(f"not a valid {what}: {err}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise InputError(f"the {what} cannot be used for constrained decoding: {'; '.join(messages)}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InputError(f"the {what} cannot be used for constrained decoding: {matcher.get_error()}")
        return matcher

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (special tokens as their text)."""
        data = self.tokenizer.decode_bytes([int(token_id)])
        return data[1:] if data[:1] == b"\xff" else data  # llguidance marks special tokens with 0xFF


def json_constraint(schema: dict | bool | None) -> tuple[str, str]:
    """(kind, source) for ``GrammarTokenizer.matcher`` of JSON under ``schema`` (None: any JSON object; the
    schema ``true``, any JSON value, as the empty schema llguidance takes)."""
    schema = {"type": "object"} if schema is None else {} if schema is True else schema
    return "json", json.dumps(schema, sort_keys=True)


_GRAMMAR_NAMES = {"json": "JSON Schema", "regex": "regular expression", "choice": "list of choices",
                  "grammar": "grammar"}


def _grammar_text(llguidance, kind: str, source: str) -> str:
    """llguidance's grammar for ``source`` of ``kind`` (see ``GrammarTokenizer.matcher``)."""
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    if kind == "choice":  # Lark string literals take JSON's escapes
        return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in json.loads(source))
    from llguidance.gbnf_to_lark import any_to_lark
    if not source.strip():
        raise ValueError("the grammar is empty")
    try:
        return any_to_lark(source)
    except Exception as err:  # the converter raises bare Exceptions too ("No 'root' rule found")
        raise ValueError(err) from None


def check_refs_end(schema) -> None:
    """Refuse a schema whose recursion has no way out (see ``schema_refs``): llguidance would decode it
    into half a value."""
    try:
        ref = unending_ref(schema)
    except RecursionError:
        raise InputError("the JSON Schema is nested too deeply to check; flatten it (use $defs and $ref)") from None
    if ref is not None:
        raise InputError(f"the JSON Schema's $ref {ref!r} can never be completed: every value of it must contain "
                         f"itself again, so no answer could end. Give the recursion a way out (make the "
                         f"recursive property optional, or allow null or an empty array there)")


@functools.lru_cache(maxsize=8)
def grammar_tokenizer(backend, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarTokenizer:
    """The ``GrammarTokenizer`` of a ``tokenizers.Tokenizer`` (cached: building it scans the vocabulary)."""
    return GrammarTokenizer(backend, vocab_size, eos_token_ids)


class GrammarConstraint:
    """Constrained decoding: each row's scores masked to the tokens its grammar matcher allows next
    (``generation.grammar``: llguidance matchers, one per row; None leaves a row unconstrained, so
    constrained and free rows share a batch). Before masking, a matcher takes the row's tokens it has
    not seen yet (those after the prompt's ``prompt_length``), so the processor needs nothing but
    ``input_ids``. The matcher fills an int32 bitmask [rows, ceil(vocab_size / 32)] on the CPU
    (``vocab_size``: the grammar tokenizer's; scores past it are never allowed), numpy unpacks its bits
    and one ``torch.where`` applies them (the decode loops run it on one thread: see
    ``cpu_kernels.torch_ops_on_one_thread``)."""

    def __init__(self, matchers: list, prompt_length: int, vocab_size: int = 0, field: str = "the grammar"):
        self.rows = [_GrammarRow(matcher, field) if matcher is not None else None for matcher in matchers]
        self.prompt_length, self.vocab_size = prompt_length, vocab_size

    def select(self, rows: list[int]) -> "GrammarConstraint":
        """The same constraint (same matchers, same progress) over a subset of its rows, in that order."""
        view = GrammarConstraint([], self.prompt_length, self.vocab_size)
        view.rows = [self.rows[i] for i in rows]
        return view

    def __call__(self, input_ids, scores):
        filled = (self.vocab_size + 31) // 32  # the words a matcher writes
        words = max((scores.shape[-1] + 31) // 32, filled)
        bitmask = np.full((len(self.rows), words), -1, dtype=np.int32)
        ids = input_ids.cpu()  # one copy from the device per step, not one per row
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            row.advance(ids[b, self.prompt_length + row.consumed:].tolist())
            bitmask[b, filled:] = 0
            row.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + b * words * 4, filled * 4)
            row.check()  # a matcher that failed while masking allows only EOS: that would end half a value
        # bit i of word w is token 32 * w + i: little-endian int32 words read as bytes, bits unpacked LSB first
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :scores.shape[-1]].view(np.bool_)
        return torch.where(torch.from_numpy(allowed).to(scores.device), scores, -torch.inf)


class _GrammarRow:
    """One row's matcher and how many generated tokens it has taken.

    A matcher that failed stays failed: every later call raises the same error. (An llguidance matcher
    in error reports ``is_stopped()``, so without this a step run again, as the server's isolation does
    to find which request broke a batched step, would read it as finished, mask all but EOS and end the
    answer in the middle of a value.) ``consumed`` counts only tokens the matcher took, so a step run
    again feeds it exactly the tokens it has not seen."""

    def __init__(self, matcher, field: str):
        self.matcher, self.consumed, self.field = matcher, 0, field
        self.error: InputError | None = None

    def advance(self, tokens: list[int]) -> None:
        self.check()
        for token in tokens:
            if self.matcher.is_stopped():  # a finished row is padded on by generate: nothing more to match
                self.consumed += 1
                continue
            if not self.matcher.consume_token(int(token)):
                self.check(refused=token)
            self.consumed += 1

    def check(self, refused: int | None = None) -> None:
        """Raise this row's error if its matcher has failed (now or before, or just ``refused`` a token)."""
        if self.error is None and (refused is not None or self.matcher.is_error()):
            detail = self.matcher.get_error() or f"token {refused} refused"
            self.error = _decoding_error(self.field, detail, self.consumed)
        if self.error is not None:
            raise self.error


LOGGED_DETAIL_CHARS = 2000  # of the grammar engine's own error text, per failed answer


def _decoding_error(field: str, detail: str, tokens: int) -> InputError:
    """A short message for a grammar that failed mid-answer; llguidance's own text (its parser state,
    about a kilobyte, but with the whole grammar in it for some errors) goes to the log only, cut short so
    that a client's huge grammar cannot flood the log."""
    shown = detail if len(detail) <= LOGGED_DETAIL_CHARS else f"{detail[:LOGGED_DETAIL_CHARS]}... " \
        f"({len(detail) - LOGGED_DETAIL_CHARS} more characters)"
    log.warning("%s: the grammar failed after %d tokens: %s", field, tokens, shown)
    if "too many items" in detail.lower() or "toocomplex" in detail.replace(" ", "").lower():
        why = "the constraint is too complex for the grammar engine to follow"
    else:
        why = "the grammar engine could not continue the answer under the constraint"
    return InputError(f"{field}: {why} (it stopped after {tokens} tokens); simplify it (fewer nested, optional "
                      f"or repeated parts) and try again")
