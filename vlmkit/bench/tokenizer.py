"""Tiny byte-level BPE tokenizers for test and benchmark checkpoints.

The tokenizer is trained with the `tokenizers` library on a small English corpus generated in code
(no download), then the model-specific special tokens are appended as *special* added tokens, so they
get the ids right after the BPE vocabulary, as in real checkpoints (whose special tokens sit at the
end of the vocabulary, e.g. DeepSeek's 100000+). A `TemplateProcessing` post-processor prepends BOS
when asked to; the byte-level decoder makes `decode(encode(text)) == text` for any text.

Generic: the benchmark's checkpoints and the tests' Janus, LLaVA-OneVision and IDEFICS builders call
it with their own special tokens.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["build_tokenizer", "tiny_corpus"]

_SUBJECTS = [
    "the dog", "a cat", "the small bird", "my friend", "the red car", "a green tree", "the old man",
    "a young woman", "the children", "this image", "that picture", "the photo", "a horse",
    "the blue house", "two cats", "three dogs", "the big truck", "a yellow flower", "the white boat",
]
_VERBS = [
    "is sitting on", "is looking at", "runs past", "jumps over", "is next to", "is under",
    "is standing near", "walks toward", "is holding", "sleeps beside", "plays with", "shows",
]
_OBJECTS = [
    "the table", "a chair", "the window", "a ball", "the grass", "the river", "a red box", "the road",
    "the wall", "a blue sky", "the door", "the mountain", "a wooden fence", "the beach", "a bowl",
]
_COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray"]
_QUESTIONS = [
    "What is in the image?",
    "Describe the image in detail.",
    "What color is the {noun}?",
    "How many {noun}s are there?",
    "Is there a {noun} in this picture?",
    "Where is the {noun}?",
    "Describe this image.",
    "What is the {noun} doing?",
    "Which image is brighter?",
    "Can you describe what you see?",
    "What does the picture show?",
    "Please describe the scene, step by step.",
]
_NOUNS = ["dog", "cat", "car", "tree", "bird", "house", "ball", "flower", "boat", "person", "sign"]
_EXTRA = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It is 10:30 in the morning; the sky is clear.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "A list: apples, oranges (and pears) - 12% off!",
    "\"Quoted\" text and 'single quotes' too?",
    "email@example.com #tag @user $5 & more... [brackets] {braces} <angle>",
    "Tabs\tand\nnew lines\n\nare here.",
    "A picture of a sunset over the sea, with orange and pink colors.",
    "User: what is this?\nAssistant: It is a cat.",
    "Café, naïve, résumé: accents work; 日本語 and emoji 🙂 are bytes too.",
]


def tiny_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """A few hundred varied English sentences with digits, punctuation and newlines."""
    rng = random.Random(seed)
    out = list(_EXTRA)
    for i in range(n_sentences):
        kind = i % 5
        if kind == 0:
            s = f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        elif kind == 1:
            s = rng.choice(_QUESTIONS).format(noun=rng.choice(_NOUNS))
        elif kind == 2:
            n = rng.randint(0, 99)
            s = f"There are {n} {rng.choice(_NOUNS)}s, and {rng.randint(1, 9)} of them are {rng.choice(_COLORS)}."
        elif kind == 3:
            s = (
                f"The {rng.choice(_NOUNS)} is {rng.choice(_COLORS)}; "
                f"the {rng.choice(_NOUNS)} is {rng.choice(_COLORS)}.\n"
                f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}!"
            )
        else:
            s = (
                f"Q: {rng.choice(_QUESTIONS).format(noun=rng.choice(_NOUNS))}\n"
                f"A: {rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, "
                f"in image {rng.randint(1, 5)}."
            )
        out.append(s)
    return out


def build_tokenizer(
    out_dir: str | os.PathLike,
    *,
    special_tokens: list[str],
    bos: str | None,
    eos: str | None,
    pad: str | None,
    unk: str | None = None,
    vocab_size: int = 600,
    add_bos: bool = True,
    seed: int = 0,
) -> Path:
    """Train a tiny byte-level BPE tokenizer and write `out_dir/tokenizer.json`; returns that path.

    `special_tokens` are appended (in that order) after the BPE vocabulary as special added tokens;
    `bos`/`eos`/`pad`/`unk` are added too if they are not already in the list. With `add_bos` a
    TemplateProcessing post-processor prepends `bos` to every encoded sequence (and to both halves of
    a pair, like LLaMA/DeepSeek tokenizers do).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    all_special = list(special_tokens)
    for tok in (bos, eos, pad, unk):
        if tok is not None and tok not in all_special:
            all_special.append(tok)

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)

    # Special tokens go after the learned vocabulary (ids vocab_size, vocab_size + 1, ...).
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in all_special]
    )

    if add_bos:
        if bos is None:
            raise ValueError("add_bos=True needs a bos token")
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    else:
        # Keeps offsets trimming consistent with the byte-level pre-tokenizer; adds nothing.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path
