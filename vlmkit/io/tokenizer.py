"""The text tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, special tokens from
``tokenizer_config.json``, padding, truncation, decoding and the checkpoint's chat template."""

from pathlib import Path

from ..errors import CheckpointError, InputError
from .chat_template import find_chat_template, render_conversation
from .checkpoint import read_json
from .assistant_masks import tokenizer_masks
from .features import BatchFeature, as_return_type
from .padding import pad_encoded, pad_length, pad_rows, padding_and_truncation
from .text import clean_up_spaces, refuse_surrogates
from .tokenizer_classes import (add_setting_tokens, apply_class_pipeline, apply_class_special_tokens,
                                apply_config_added_tokens, class_defaults, config_model_type, load_settings,
                                tokenizer_class, with_settings, with_special_tokens_map)

# options of the tokenizer call (``Tokenizer.__call__`` implements them); ``verbose`` only silences warnings
TEXT_OPTIONS = frozenset({"add_special_tokens", "padding", "padding_side", "truncation", "max_length",
                          "pad_to_multiple_of", "return_attention_mask", "return_token_type_ids", "verbose"})
# transformers' tokenizer options vlmkit does not implement: an error naming them, never silently dropped
TEXT_OPTIONS_NOT_IMPLEMENTED = frozenset({"text_pair", "text_target", "text_pair_target", "stride",
                                          "is_split_into_words", "return_overflowing_tokens",
                                          "return_special_tokens_mask", "return_offsets_mapping", "return_length",
                                          "return_mm_token_type_ids", "return_text_replacement_offsets"})
# keyword arguments of from_pretrained that set what the tokenizer reads from tokenizer_config.json (and every
# ``*_token`` one, a named special token)
TOKENIZER_SETTINGS = frozenset({"padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces",
                                "add_prefix_space", "legacy", "split_special_tokens", "additional_special_tokens",
                                "extra_special_tokens", "chat_template", "model_input_names"})


def tokenizer_settings(options: dict) -> dict:
    """Take the tokenizer settings (``padding_side``, ``pad_token``...) out of a from_pretrained call's ``options``."""
    return {key: options.pop(key) for key in list(options) if key in TOKENIZER_SETTINGS or key.endswith("_token")}


def token_text(value):
    """A special token's text, whether the config writes it as a string or as ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def _special_token(key: str) -> property:
    """A named special token as a settable attribute (``tokenizer.pad_token = tokenizer.eos_token``)."""
    return property(lambda self: self.special_tokens.get(key), lambda self, token: self.set_special_token(key, token))


def _special_token_id(key: str) -> property:
    """A named special token's id as a settable attribute (``tokenizer.pad_token_id = 2``)."""
    def set_id(self, token_id):
        self.set_special_token(key, None if token_id is None else self.backend.id_to_token(int(token_id)))
    return property(lambda self: self.special_token_id(key), set_id)


def _added_tokens(new_tokens, special: bool) -> list:
    """``tokenizers.AddedToken`` objects for one token or a list (strings or AddedTokens), as transformers
    adds them: special ones matched as written, others after normalisation."""
    from tokenizers import AddedToken

    items = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
    if any(not isinstance(t, (str, AddedToken)) or not str(t) for t in items):
        raise InputError(f"tokens to add must be non-empty strings (or tokenizers.AddedToken), got {new_tokens!r}")
    return [t if isinstance(t, AddedToken) else AddedToken(t, special=special, normalized=not special) for t in items]


class Tokenizer:
    """A fast tokenizer with the call/decode surface of transformers' tokenizers."""

    def __init__(self, backend, config: dict, chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.padding_side = config.get("padding_side", "right")
        self.folder = None  # the folder from_pretrained read, whose files save_pretrained copies
        self.model_max_length = int(config.get("model_max_length") or 10**30)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # named special tokens: bos/eos/pad/unk, and extras such as image_token, written either at the
        # top level (transformers 5) or under extra_special_tokens (transformers 4)
        self.special_tokens = {k: token_text(v) for k, v in config.items()
                               if k.endswith("_token") and isinstance(v, (str, dict)) and token_text(v)}
        extra = config.get("extra_special_tokens") or {}
        if isinstance(extra, dict):
            self.special_tokens.update({k: token_text(v) for k, v in extra.items()})
        # unnamed special tokens: transformers 4's additional_special_tokens, or transformers 5's extra_special_tokens
        # written as a list
        unnamed = [*(config.get("additional_special_tokens") or []), *(extra if isinstance(extra, list) else [])]
        self.additional_special_tokens = [token_text(t) for t in unnamed]

    @classmethod
    def from_pretrained(cls, folder, **settings) -> "Tokenizer":
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (and the chat template) from a folder;
        ``settings`` (``padding_side``, ``pad_token``, ``chat_template``...) override the config's, as the
        keyword arguments of transformers' ``from_pretrained`` do; a special token they name that the
        vocabulary lacks is added to it."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json; vlmkit needs the fast tokenizer file")
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        # the keywords over the file's settings, before the class pipeline reads them
        config, settings = with_settings(with_special_tokens_map(folder, config), load_settings(settings))
        try:
            tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
            backend = Backend.from_str(tokenizer_json)
        except Exception as err:  # tokenizers raises a bare Exception for every malformed file
            raise CheckpointError(f"{folder / 'tokenizer.json'} cannot be read by the tokenizers library ("
                                  f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}); the file is "
                                  f"damaged or not a fast-tokenizer file: copy the checkpoint's tokenizer.json "
                                  f"again") from None
        backend.no_padding()
        backend.no_truncation()
        # the pipeline, added-token flags and defaults transformers 5 gives the class the checkpoint names: its ids
        # differ from tokenizer.json's as written for LlamaTokenizer and Qwen2Tokenizer (see tokenizer_classes.py)
        class_name = tokenizer_class(config, config_model_type(folder), tokenizer_json)
        apply_class_pipeline(backend, class_name, config)
        apply_config_added_tokens(backend, config)
        template = settings.get("chat_template") or find_chat_template(folder, config)
        tokenizer = cls(backend, {**class_defaults(class_name), **config}, template)
        add_setting_tokens(backend, settings)
        apply_class_special_tokens(backend, class_name, tokenizer.all_special_tokens)
        tokenizer.folder = folder
        return tokenizer

    # --- special tokens ----------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        """The id of a token string, or None."""
        return None if token is None else self.backend.token_to_id(token)

    def special_token_id(self, key: str) -> int | None:
        """The id of a named special token such as ``"image_token"`` or ``"pad_token"``."""
        return self.token_id(self.special_tokens.get(key))

    def set_special_token(self, key: str, token: str | None) -> None:
        """Name ``token`` (a token of the vocabulary, or None to unset) the ``key`` special token, as
        ``tokenizer.pad_token = tokenizer.eos_token`` does in transformers."""
        if token is None:
            self.special_tokens.pop(key, None)
            return
        if not isinstance(token, str) or self.token_id(token) is None:
            raise InputError(f"{key}: {token!r} is not a token of this tokenizer's vocabulary; use one of its "
                             f"tokens (e.g. tokenizer.eos_token)")
        self.special_tokens[key] = token

    bos_token, eos_token = _special_token("bos_token"), _special_token("eos_token")
    pad_token, unk_token = _special_token("pad_token"), _special_token("unk_token")
    bos_token_id, eos_token_id = _special_token_id("bos_token"), _special_token_id("eos_token")
    pad_token_id, unk_token_id = _special_token_id("pad_token"), _special_token_id("unk_token")

    is_fast = True  # a tokenizers (Rust) tokenizer, as transformers' fast tokenizers

    @property
    def truncation_side(self) -> str:
        return self.config.get("truncation_side", "right")

    @truncation_side.setter
    def truncation_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise InputError(f"truncation_side must be 'left' or 'right', got {side!r}")
        self.config["truncation_side"] = side

    @property
    def special_tokens_map(self) -> dict:
        """Every named special token (bos/eos/pad/unk and the model's own, e.g. ``image_token``), as
        transformers 5 lists them; chat templates see them as variables."""
        return dict(self.special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = list(dict.fromkeys([*self.special_tokens.values(), *self.additional_special_tokens]))
        return [t for t in tokens if self.token_id(t) is not None]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.token_id(t) for t in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, added tokens not counted (``len(tokenizer)`` counts them)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        """id -> added token (the tokenizers library's ``AddedToken``)."""
        return dict(sorted(self.backend.get_added_tokens_decoder().items()))

    @property
    def model_input_names(self) -> list[str]:
        return list(self.config.get("model_input_names") or ("input_ids", "attention_mask"))

    @property
    def name_or_path(self) -> str:
        return str(self.folder or "")

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Add tokens (strings or ``tokenizers.AddedToken``) after the vocabulary; returns how many were new,
        as transformers' ``add_tokens`` (then ``model.resize_token_embeddings(len(tokenizer))``)."""
        tokens = _added_tokens(new_tokens, special_tokens)
        added = self._add_to_vocabulary(tokens, special_tokens)
        if special_tokens:
            self.additional_special_tokens += [t.content for t in tokens if t.content not in self.all_special_tokens]
        return added

    def _add_to_vocabulary(self, tokens: list, special: bool) -> int:
        before = len(self)
        (self.backend.add_special_tokens if special else self.backend.add_tokens)(tokens)
        return len(self) - before

    def add_special_tokens(self, special_tokens_dict: dict, replace_additional_special_tokens: bool = True) -> int:
        """Add and name special tokens (``{"pad_token": "<pad>", "additional_special_tokens": [...]}``); returns
        how many were new, as transformers' ``add_special_tokens``."""
        added = 0
        for key, value in special_tokens_dict.items():
            tokens = _added_tokens(value, special=True)
            added += self._add_to_vocabulary(tokens, special=True)
            if key in ("additional_special_tokens", "extra_special_tokens"):  # unnamed special tokens
                kept = [] if replace_additional_special_tokens else self.additional_special_tokens
                self.additional_special_tokens = list(dict.fromkeys([*kept, *(t.content for t in tokens)]))
            else:
                self.special_tokens[key] = tokens[0].content
        return added

    def save_pretrained(self, save_directory, **options) -> tuple[str, ...]:
        """Write tokenizer.json and tokenizer_config.json (and the chat template) that transformers and
        vlmkit load back as this tokenizer."""
        from .saving import save_tokenizer_files

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer_files(self, out)
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        return tuple(str(out / name) for name in ("tokenizer_config.json", "tokenizer.json"))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text`` (special tokens only when asked, as transformers' ``tokenize``)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.token_id(tokens)
        return [self.token_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    # --- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **options):
        """Token ids of one text: a list, or with ``return_tensors="pt"`` a [1, T] tensor (and the other
        options of the tokenizer call, e.g. ``truncation``/``max_length``, as transformers' ``encode``)."""
        if not options and return_tensors is None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors, **options)["input_ids"]

    def __call__(self, text, *, padding=False, padding_side=None, add_special_tokens=True, truncation=None,
                 max_length=None, pad_to_multiple_of=None, return_tensors=None, return_attention_mask=None,
                 return_token_type_ids=None, verbose=True, **unsupported):
        """Encode one text or a batch with transformers' padding and truncation rules: ``padding``
        True/"longest" pads to the longest row, "max_length" to ``max_length`` (else the tokenizer's
        ``model_max_length``), rounded up to ``pad_to_multiple_of``, on ``padding_side``; ``truncation``
        (True/"longest_first"/"only_first"; implied by a ``max_length`` without padding) cuts rows to
        ``max_length`` (else ``model_max_length``) on the tokenizer's ``truncation_side``, special tokens
        counted. ``return_tensors``: None (lists), "pt" or "np". The result reads as a dict or by
        attribute (``tokenizer(words).input_ids``), as transformers' does."""
        refused = sorted(k for k, v in unsupported.items() if k in TEXT_OPTIONS_NOT_IMPLEMENTED and v)
        if refused:
            raise InputError(f"vlmkit's tokenizer does not implement {', '.join(refused)}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if any(not isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings")
        for text in texts:
            refuse_surrogates(text)
        pad_to, cut_to = padding_and_truncation(padding, truncation, max_length, pad_to_multiple_of,
                                                self.known_max_length)
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        rows = [e.ids if cut_to is None or len(e.ids) <= cut_to else self._truncated(t, cut_to, add_special_tokens)
                for t, e in zip(texts, encodings)]
        masks = [[1] * len(r) for r in rows]
        if pad_to is not None and rows:
            rows, masks = pad_rows(rows, pad_length(pad_to, rows, pad_to_multiple_of), padding_side or self.padding_side,
                                   self.pad_token_id)
        features = {"input_ids": rows}
        input_names = self.model_input_names
        if return_token_type_ids or (return_token_type_ids is None and "token_type_ids" in input_names):
            features["token_type_ids"] = [[0] * len(r) for r in rows]
        if return_attention_mask or (return_attention_mask is None and "attention_mask" in input_names):
            features["attention_mask"] = masks
        if single and return_tensors is None:
            features = {k: v[0] for k, v in features.items()}
        return as_return_type(BatchFeature(features), return_tensors)

    @property
    def known_max_length(self) -> int | None:
        """``model_max_length`` when the tokenizer config sets a real one (transformers' placeholder for
        "unlimited", 1e30, reads as None)."""
        return self.model_max_length if self.model_max_length < 10**20 else None

    def _truncated(self, text: str, length: int, add_special_tokens: bool) -> list[int]:
        """``text``'s ids cut to ``length`` with the special tokens kept, as the tokenizers library
        truncates: the text's own tokens are cut on ``truncation_side``, then the special tokens added."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        room = length - (self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
        encoding.truncate(max(room, 0), direction=self.config.get("truncation_side", "right"))
        return self.backend.post_process(encoding, None, add_special_tokens).ids

    def pad(self, encoded_inputs, padding=True, max_length=None, pad_to_multiple_of=None, padding_side=None,
            return_attention_mask=None, return_tensors=None, verbose=True):
        """Pad features encoded earlier (one example, a dict of rows, or a list of examples, as a data
        collator hands them over) as transformers' ``tokenizer.pad``; see ``padding.pad_encoded``."""
        return pad_encoded(self, encoded_inputs, padding, max_length, pad_to_multiple_of, padding_side,
                           return_attention_mask, return_tensors)

    # --- decoding ----------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **_ignored):
        """Text of one sequence of ids (a list, 1-D tensor or array); a batch of them (2-D) gives one text per
        row, as transformers 5's ``decode`` does."""
        if isinstance(ids, dict):  # a tokenizer's output
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        if ids and (min(ids) < 0 or max(ids) >= 2**32):  # (the tokenizers library takes unsigned 32-bit ids)
            raise InputError(f"token ids are whole numbers from 0 to 2**32 - 1, got {min(ids)} to {max(ids)}")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_spaces(text) if clean_up_tokenization_spaces and self._cleanup_applies else text

    @property
    def _cleanup_applies(self) -> bool:
        # transformers 5 skips the space clean-up for BPE vocabularies (it was made for WordPiece and strips real
        # spaces before punctuation) unless the config insists
        return (type(self.backend.model).__name__ != "BPE"
                or bool(self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Text of each row."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # --- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            return_dict: bool = True, return_tensors: str | None = None,
                            return_assistant_tokens_mask: bool = False, padding=None, truncation: bool = False,
                            max_length: int | None = None, tokenizer_kwargs: dict | None = None, **kwargs):
        """Render one conversation (a list of messages) or a batch of them with the chat template; with
        ``tokenize`` (the default, as in transformers 5) their token ids: ``input_ids`` and ``attention_mask``
        (``return_dict``, the default) or the ids alone, tokenized with ``padding``, ``truncation``,
        ``max_length`` and ``tokenizer_kwargs`` (a batch of tensors is padded unless ``padding=False``);
        ``return_assistant_tokens_mask`` adds ``assistant_masks`` (1 on the tokens the template's
        ``{% generation %}`` blocks hold)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        spans = [[] for _ in conversations] if return_assistant_tokens_mask else None
        rendered = self.render_chats(conversations, chat_template, add_generation_prompt, continue_final_message,
                                     spans, **kwargs)
        if not tokenize:
            return rendered if batched else rendered[0]
        if padding is None:
            padding = batched and return_tensors is not None
        encoded = self(rendered if batched else rendered[0], add_special_tokens=False, return_tensors=return_tensors,
                       padding=padding, truncation=truncation, max_length=max_length, **(tokenizer_kwargs or {}))
        if return_dict and return_assistant_tokens_mask:
            rows = encoded["input_ids"].tolist() if return_tensors else encoded["input_ids"]
            masks = tokenizer_masks(self.backend, rendered, spans, rows if batched or return_tensors else [rows],
                                    self.padding_side)
            encoded["assistant_masks"] = as_return_type(BatchFeature(assistant_masks=masks), return_tensors)[
                "assistant_masks"] if return_tensors else masks if batched else masks[0]
        return encoded if return_dict else encoded["input_ids"]

    def render_chats(self, conversations: list, chat_template: str | None = None, add_generation_prompt: bool = False,
                     continue_final_message: bool = False, generation_spans: list | None = None,
                     **variables) -> list[str]:
        """Each conversation rendered with ``chat_template`` (else the checkpoint's); the special tokens and
        ``variables`` are the template's variables; ``generation_spans`` (one list per conversation)
        receives where the ``{% generation %}`` blocks lie."""
        template = chat_template or self.chat_template
        if template is None:
            raise InputError("this checkpoint has no chat template; pass chat_template=... or build the prompt yourself")
        return [render_conversation(template, list(c), add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    generation_spans=generation_spans[i] if generation_spans is not None else None,
                                    **{**self.special_tokens_map, **variables}) for i, c in enumerate(conversations)]


def added_token_id(folder: Path, content: str) -> int | None:
    """The id of an added token in a folder's ``tokenizer.json`` without building the tokenizer."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    for token in read_json(path).get("added_tokens", []):
        if token.get("content") == content:
            return int(token["id"])
    return None
