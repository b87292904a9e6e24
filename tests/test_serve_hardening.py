"""Hardening of the server's answer path: the incremental stop-string check and detokenizer give exactly
what decoding the whole answer at every token gives (stops straddling tokens and multi-byte characters,
held-back text, streamed chunks), and an answer the server cannot turn into what was asked ends as text,
never as a 500."""

import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models

from vlmkit.io.tokenizer import Tokenizer
from vlmkit.serve.answers import AnswerText
from vlmkit.serve.detokenizer import IncrementalText
from vlmkit.serve.options import ChatOptions, tool_calls


class WholeTextAnswer:
    """The stop check as it was: the whole answer decoded and searched at every token (the reference)."""

    def __init__(self, tokenizer, stops, prefix="", include_stop=False, skip_special_tokens=True, min_tokens=0):
        self.tokenizer, self.stops, self.prefix = tokenizer, stops, prefix
        self.include_stop, self.skip_special_tokens, self.min_tokens = include_stop, skip_special_tokens, min_tokens
        self.ids, self.text, self.unchecked_end, self.sent = [], "", 0, 0
        self.stopped_at = self.stop_end = None

    def add(self, token):
        self.ids.append(token)
        before = len(self.text)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        self.text = self.text.removeprefix(self.prefix)
        if len(self.ids) < self.min_tokens:
            return False
        if len(self.ids) == self.min_tokens:
            self.unchecked_end = before
        starts = [(s, max(0, self.unchecked_end - len(s))) for s in self.stops]
        hits = [(i, i + len(s)) for i, s in ((self.text.find(s, start), s) for s, start in starts) if i >= 0]
        if hits:
            self.stopped_at, self.stop_end = min(hits)
        return self.stopped_at is not None

    @property
    def final(self):
        if self.stopped_at is None:
            return self.text
        return self.text[:self.stop_end if self.include_stop else self.stopped_at]

    def take_ready(self, finished=False):
        end = len(self.final)
        if not finished:
            end = len(self.text.rstrip("\ufffd"))
            for size in range(min(end, max((len(s) for s in self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(self.text[end - size:end]) for s in self.stops):
                    end -= size
                    break
        chunk = self.final[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return chunk


def _sentencepiece_tokenizer(clean_up: bool) -> Tokenizer:
    """A Llama-style vocabulary: "▁" pieces, byte fallback (<0xE2>...), a Strip of the first space, specials."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁a", "▁b", "a", "b", "END", "E",
              "ND", "▁END", ".", "▁.", "'", "▁'", "s", "n't", "▁n't", "▁x", "x", "?", "▁?", "▁▁"]
    backend = Backend(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.add_special_tokens(["<s>", "</s>"])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, {"clean_up_tokenization_spaces": clean_up})


def _tokenizers(janus_dir):
    return {"byte-level (janus)": Tokenizer.from_pretrained(janus_dir),
            "sentencepiece": _sentencepiece_tokenizer(False),
            "sentencepiece, clean-up of spaces": _sentencepiece_tokenizer(True)}


TEXTS = ["héllo wörld, €uro 😀 日本語 END. ENough END", "a 'b n't it? x . END 😀😀 ü", "€€€ 😀END😀 ENDEND"]


def _sequences(tokenizer, rng):
    """Token sequences: texts split into tokens (bytes of a character in separate tokens where the vocabulary
    has no piece for it), random ids with special tokens among them, and stray bytes of broken characters."""
    vocab = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    specials = [i for i in range(vocab) if tokenizer.backend.id_to_token(i) in ("<s>", "</s>", "<unk>")
                or "<|" in (tokenizer.backend.id_to_token(i) or "") or "｜" in (tokenizer.backend.id_to_token(i) or "")]
    sequences = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not tokenizer.decode(ids):  # a vocabulary without these pieces
            continue
        sequences.append(ids)
        mixed = list(ids)
        for _ in range(3):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(specials or ids))
        sequences.append(mixed)
    for _ in range(12):
        sequences.append([rng.randrange(vocab) for _ in range(rng.randrange(5, 60))])
    return sequences


def _stops(tokenizer, ids, rng):
    """Stop strings cut from the answer's own text, so they straddle tokens and characters, and a long one."""
    text = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
    stops = []
    for _ in range(3):
        if len(text) > 2:
            start = rng.randrange(len(text) - 1)
            stops.append(text[start:start + rng.randrange(1, 6)])
    return [s for s in stops if s] + ["END", "x" * 300]


def _run(answer, ids):
    """Every step's (stopped?, chunk sent), then the final text and where the stop was found."""
    steps = []
    for token in ids:
        stopped = answer.add(token)
        steps.append((stopped, answer.take_ready(finished=stopped)))
        if stopped:
            break
    else:
        steps.append((None, answer.take_ready(finished=True)))
    return steps, answer.final, answer.stopped_at, answer.stop_end


@pytest.mark.parametrize("include_stop,skip_special,min_tokens,prefix",
                         [(False, True, 0, ""), (True, True, 0, " "), (False, False, 3, ""), (True, False, 7, " ")])
def test_incremental_answers_equal_whole_text_decoding_with_stops_across_tokens_and_characters(
        janus_dir, include_stop, skip_special, min_tokens, prefix):
    rng = random.Random(f"{include_stop}{skip_special}{min_tokens}{prefix}")
    for name, tokenizer in _tokenizers(janus_dir).items():
        for ids in _sequences(tokenizer, rng):
            for stops in (_stops(tokenizer, ids, rng), [], ["\ufffd"], ["é", " w", "😀 "]):
                settings = dict(prefix=prefix, include_stop=include_stop, skip_special_tokens=skip_special,
                                min_tokens=min_tokens)
                expected = _run(WholeTextAnswer(tokenizer, stops, **settings), ids)
                assert _run(AnswerText(tokenizer, stops, **settings), ids) == expected, (name, ids, stops)


def test_the_detokenizer_finds_a_tokenizers_anchor_once_not_for_every_answer():
    tokenizer = _sentencepiece_tokenizer(False)
    decoded = []
    tokenizer.decode = lambda ids, **options: decoded.append(ids) or Tokenizer.decode(tokenizer, ids, **options)
    first = IncrementalText(tokenizer)
    probes = len(decoded)
    assert probes > 0 and first.anchor == tokenizer.token_id("a")
    second = IncrementalText(tokenizer)
    assert len(decoded) == probes and (second.anchor, second.anchor_text) == (first.anchor, first.anchor_text)
    IncrementalText(tokenizer, skip_special_tokens=False)  # another setting may decode otherwise: looked up again
    assert len(decoded) > probes


def test_a_forced_tool_call_nested_too_deeply_to_read_ends_as_text_not_a_500():
    deep = "[" * 5000 + "]" * 5000  # json.loads gives up (RecursionError) long before this depth
    assert tool_calls(ChatOptions(tool_names=("f",), named_tool="f"), deep) is None
    assert tool_calls(ChatOptions(tool_names=("f",)), '{"name": "f", "arguments": ' + deep + "}") is None


def test_a_failed_grammar_logs_the_engines_text_cut_short(caplog):
    """llguidance's error text can hold the whole grammar (a request with thousands of tools logged 600 KB)."""
    from vlmkit.generation.grammar import LOGGED_DETAIL_CHARS, _decoding_error

    with caplog.at_level("WARNING", logger="vlmkit.grammar"):
        error = _decoding_error("tools", "x" * 100_000, 3)
    (record,) = caplog.records
    assert len(record.getMessage()) < LOGGED_DETAIL_CHARS + 200 and "98000 more characters" in record.getMessage()
    assert "x" * 100 not in str(error)  # the client's message stays short too
