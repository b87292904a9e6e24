"""Tokenizer folders shaped like the real checkpoints' (offline, from a seed), for the tokenizer-class tests.

vlmkit's other test checkpoints save a generic byte-level BPE under the generic class, which transformers
uses as written. Real checkpoints name other classes, and transformers 5 rebuilds the pipeline per class:

- ``llama_sp_tokenizer_json``: a LLaMA sentencepiece-style ``tokenizer.json`` as the LLaMA/IDEFICS
  checkpoints ship it (BPE with byte fallback, ``<unk>``/``<s>``/``</s>`` then the 256 byte tokens first,
  normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, decoder Replace/ByteFallback/Fuse/Strip,
  a post-processor adding ``<s>``), named ``LlamaTokenizer`` in ``tokenizer_config.json``;
- ``qwen2_tokenizer_json``: Qwen2's (NFC, the Split regex + ByteLevel, a ByteLevel decoder), named
  ``Qwen2TokenizerFast`` as llava-hf/llava-onevision-qwen2-*-hf do;
- Janus-Pro's is the generic byte-level BPE (vlmkit.bench.tokenizer) named ``LlamaTokenizerFast``.

``write_tokenizer_folder`` writes one with its ``tokenizer_config.json`` and a ``config.json`` naming the
model type (transformers' AutoTokenizer reads it to pick the class); ``with_tokenizer`` copies a tiny
checkpoint (builders/idefics.py...) with its tokenizer files swapped, for the processors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from vlmkit.bench.tokenizer import build_tokenizer, tiny_corpus

__all__ = ["llama_sp_tokenizer_json", "qwen2_tokenizer_json", "janus_tokenizer_json", "write_tokenizer_folder",
           "with_tokenizer", "added_token", "config_token", "QWEN2_PRETOKENIZE_REGEX"]

# Qwen2's tokenizer.json Split pattern (the same string transformers' Qwen2Tokenizer hard-codes)
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# text the tiny vocabularies learn from: the bench corpus plus chat-shaped lines
_CORPUS_EXTRA = ["User: What is in this image?<end_of_utterance>\nAssistant: A cat.", "  two spaces  ",
                 "<|im_start|>user\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"]


def added_token(token_id: int, content: str, special: bool = True, normalized: bool = False) -> dict:
    """One entry of tokenizer.json's ``added_tokens``."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def config_token(content: str) -> dict:
    """A special token as tokenizer_config.json files saved before transformers 4.34 write them."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def _trained_pieces(pre_tokenizer, vocab_size: int, seed: int, alphabet: list[str]) -> tuple[list[str], list]:
    """A BPE vocabulary (tokens in id order) and its merges, trained on the tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(tiny_corpus(seed=seed) + _CORPUS_EXTRA, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return sorted(model["vocab"], key=model["vocab"].get), model["merges"]


def llama_sp_tokenizer_json(extra_tokens: list[str], vocab_size: int = 400, seed: int = 0,
                            extra_special: bool = True, extra_normalized: bool = False) -> dict:
    """A LLaMA-style tokenizer.json: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, bytes ``<0x00>``..``<0xFF>`` 3..258,
    the trained pieces (``▁the``...), then ``extra_tokens`` as added tokens (IDEFICS' image tokens)."""
    # trained with sentencepiece's word boundaries (a piece never spans "▁" except at its start)
    pieces, merges = _trained_pieces(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                                     vocab_size, seed, ["▁"])
    head = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    vocab = {token: i for i, token in enumerate([*head, *(p for p in pieces if p not in head)])}
    added = [added_token(i, t) for i, t in enumerate(head[:3])]
    added += [added_token(len(vocab) + i, t, extra_special, extra_normalized) for i, t in enumerate(extra_tokens)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def qwen2_tokenizer_json(extra_tokens: list[str], vocab_size: int = 500, seed: int = 0) -> dict:
    """A Qwen2-style tokenizer.json: byte-level BPE behind NFC and Qwen2's Split regex, ``extra_tokens``
    (``<|endoftext|>``, ``<|im_start|>``...) added after the vocabulary, no BOS."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated")
    pieces, merges = _trained_pieces(pre_tokenizers.Sequence([split, byte_level]), vocab_size, seed,
                                     pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(pieces)}
    byte_level_json = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added_token(len(vocab) + i, t) for i, t in enumerate(extra_tokens)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level_json]},
        "post_processor": {**byte_level_json, "trim_offsets": False},
        "decoder": byte_level_json,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def janus_tokenizer_json(scratch: str | os.PathLike, special_tokens: list[str], bos: str, eos: str) -> dict:
    """DeepSeek's byte-level BPE as Janus-Pro ships it (a post-processor adding BOS)."""
    path = build_tokenizer(scratch, special_tokens=special_tokens, bos=bos, eos=eos, pad=None, vocab_size=500)
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_tokenizer_folder(out_dir: str | os.PathLike, tokenizer_json: dict, tokenizer_config: dict,
                           model_type: str) -> Path:
    """Write tokenizer.json, tokenizer_config.json and a config.json naming ``model_type``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config),
                          ("config.json", {"model_type": model_type})):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    return out



def with_tokenizer(src: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_config: dict,
                   tokenizer_json: dict | None = None, special_tokens_map: dict | None = None) -> Path:
    """A copy of the checkpoint folder ``src`` whose tokenizer_config.json is ``tokenizer_config``, whose
    tokenizer.json is ``tokenizer_json`` (else ``src``'s) and, given one, with a special_tokens_map.json."""
    out = Path(out_dir)
    shutil.copytree(src, out, dirs_exist_ok=True)
    files = {"tokenizer_config.json": tokenizer_config, "tokenizer.json": tokenizer_json,
             "special_tokens_map.json": special_tokens_map}
    for name, content in files.items():
        if content is not None:
            (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    return out
