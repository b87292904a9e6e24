"""The text tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, special tokens from
``tokenizer_config.json``, padding, decoding and the checkpoint's chat template."""

from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .chat_template import find_chat_template, render_chat_template
from .checkpoint import read_json
from .features import BatchFeature

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def token_text(value):
    """A special token's text, whether the config writes it as a string or as ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A fast tokenizer with the call/decode surface of transformers' tokenizers."""

    def __init__(self, backend, config: dict, chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.padding_side = config.get("padding_side", "right")
        self.model_max_length = int(config.get("model_max_length") or 10**9)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # named special tokens: bos/eos/pad/unk, and extras such as image_token, written either at the
        # top level (transformers 5) or under extra_special_tokens (transformers 4)
        self.special_tokens = {k: token_text(v) for k, v in config.items()
                               if k.endswith("_token") and isinstance(v, (str, dict)) and token_text(v)}
        extra = config.get("extra_special_tokens") or {}
        if isinstance(extra, dict):
            self.special_tokens.update({k: token_text(v) for k, v in extra.items()})
        self.additional_special_tokens = [token_text(t) for t in config.get("additional_special_tokens") or []]

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (and the chat template) from a folder."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json; vlmkit needs the fast tokenizer file")
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, config, find_chat_template(folder, config))

    # --- special tokens ----------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        """The id of a token string, or None."""
        return None if token is None else self.backend.token_to_id(token)

    def special_token_id(self, key: str) -> int | None:
        """The id of a named special token such as ``"image_token"`` or ``"pad_token"``."""
        return self.token_id(self.special_tokens.get(key))

    @property
    def bos_token(self):
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self):
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self):
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self):
        return self.special_token_id("bos_token")

    @property
    def eos_token_id(self):
        return self.special_token_id("eos_token")

    @property
    def pad_token_id(self):
        return self.special_token_id("pad_token")

    @property
    def special_tokens_map(self) -> dict:
        return {k: v for k, v in self.special_tokens.items() if k in _SPECIAL_KEYS}

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.token_id(tokens)
        return [self.token_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    # --- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, *, padding=False, padding_side=None, add_special_tokens=True, truncation=False,
                 max_length=None, return_tensors=None, return_attention_mask=True, **_ignored):
        """Encode one text or a batch; ``padding`` True/"longest" pads to the longest row (left or right).
        The result reads as a dict or by attribute (``tokenizer(words).input_ids``), as transformers' does."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if any(not isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings")
        rows = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length") and len(rows) > 0:
            target = max_length if padding == "max_length" and max_length else max(len(r) for r in rows)
            rows, masks = self.pad(rows, target, padding_side or self.padding_side)
        elif return_tensors == "pt" and len({len(r) for r in rows}) > 1:
            raise InputError("texts of different lengths need padding=True to be returned as one tensor")
        if return_tensors == "pt":
            out = BatchFeature(input_ids=torch.tensor(rows, dtype=torch.long),
                               attention_mask=torch.tensor(masks, dtype=torch.long))
        elif single:
            out = BatchFeature(input_ids=rows[0], attention_mask=masks[0])
        else:
            out = BatchFeature(input_ids=rows, attention_mask=masks)
        if not return_attention_mask:
            out.pop("attention_mask")
        return out

    def pad(self, rows: list[list[int]], length: int, side: str) -> tuple[list[list[int]], list[list[int]]]:
        """Pad rows to ``length`` with the pad token on ``side``; returns (ids, attention masks)."""
        pad_id = self.pad_token_id
        if pad_id is None:
            if any(len(r) != length for r in rows):
                raise InputError("this tokenizer has no pad token, so texts of different lengths cannot be batched")
            pad_id = 0
        ids, masks = [], []
        for row in rows:
            fill = length - len(row)
            if side == "left":
                ids.append([pad_id] * fill + row)
                masks.append([0] * fill + [1] * len(row))
            else:
                ids.append(row + [pad_id] * fill)
                masks.append([1] * len(row) + [0] * fill)
        return ids, masks

    # --- decoding ----------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **_ignored) -> str:
        """Text of one sequence of ids (a list or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Text of each row."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # --- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs):
        """Render one conversation (a list of messages) or a batch of them with the chat template."""
        template = chat_template or self.chat_template
        if template is None:
            raise InputError("this checkpoint has no chat template; pass chat_template=... or build the prompt yourself")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        rendered = [render_chat_template(template, list(c), add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens_map, **kwargs) for c in conversations]
        if tokenize:
            ids = [self.encode(r, add_special_tokens=False) for r in rendered]
            return ids if batched else ids[0]
        return rendered if batched else rendered[0]


def _clean_up_spaces(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def added_token_id(folder: Path, content: str) -> int | None:
    """The id of an added token in a folder's ``tokenizer.json`` without building the tokenizer."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    for token in read_json(path).get("added_tokens", []):
        if token.get("content") == content:
            return int(token["id"])
    return None
