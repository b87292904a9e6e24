"""The text pipeline transformers 5 gives a checkpoint's tokenizer class, applied to the ``tokenizer.json`` loaded.

transformers 5 does not use ``tokenizer.json`` as written for every class: ``LlamaTokenizer`` (IDEFICS) and
``Qwen2Tokenizer`` (LLaVA-OneVision) keep the file's vocabulary, merges, added tokens and post-processor but
build their own normalizer, pre-tokenizer, decoder and BPE options (``tokenization_llama.py``,
``tokenization_qwen2.py``). A LLaMA sentencepiece file, for one, prepends "▁" with a normalizer, so before
every piece of text between special tokens ("<image>world" -> "▁world"), where transformers 5's Metaspace
(``legacy`` false) prepends it to the start of the text only. vlmkit gives transformers' ids, so it rebuilds
the same way, deciding by the class the checkpoint names; every other class (``PreTrainedTokenizerFast``,
``TokenizersBackend``...) keeps the file as it is, as transformers does. tests/test_tokenizer_classes.py
compares both with transformers.

The same holds for what transformers 5 takes from tokenizer_config.json beside the file, for every class: the
flags of ``added_tokens_decoder`` over tokenizer.json's, ``split_special_tokens``, the class's default special
tokens and padding side, and the special_tokens_map.json of checkpoints saved before transformers 4.34.
"""

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

from ..errors import CheckpointError, InputError
from .checkpoint import read_json

# Qwen2Tokenizer's pre-tokenizer pattern (transformers' models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX)
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# the class AutoTokenizer picks from config.json's model type when tokenizer_config.json names none
_CLASS_OF_MODEL_TYPE = {"idefics": "LlamaTokenizer"}
# the order transformers adds the named special tokens a from_pretrained keyword brings that the vocabulary lacks
_SPECIAL_TOKEN_ORDER = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_UNNAMED_SPECIAL_TOKENS = ("additional_special_tokens", "extra_special_tokens")


def tokenizer_class(config: dict, model_type: str | None, tokenizer_json: str) -> str:
    """The class transformers 5's AutoTokenizer loads for a checkpoint (its tokenizer_config.json ``config``,
    config.json's ``model_type``, the text of its tokenizer.json), without the "Fast" suffix;
    "TokenizersBackend" where it uses tokenizer.json as written."""
    named = config.get("tokenizer_class")
    if not (isinstance(named, str) and named):
        return _CLASS_OF_MODEL_TYPE.get(model_type, "TokenizersBackend")
    name = named.removesuffix("Fast")
    # AutoTokenizer loads a checkpoint that names LlamaTokenizer over a byte-level file (Janus-Pro's, Llama 3's)
    # with the generic class: the Metaspace pipeline would break it. It tests the file's text, as here, and
    # only for a class the checkpoint names (one the model type picks is used even over a byte-level file).
    if name == "LlamaTokenizer" and '"ByteLevel"' in tokenizer_json:
        return "TokenizersBackend"
    return name if name in _REBUILDS else "TokenizersBackend"


def apply_class_pipeline(backend, name: str, config: dict) -> None:
    """Give ``backend`` (a tokenizers.Tokenizer read from tokenizer.json) the pipeline transformers 5's
    ``name`` class builds; nothing for a class that uses the file as written."""
    rebuild = _REBUILDS.get(name)
    if rebuild is not None:
        rebuild(backend, config)


def with_special_tokens_map(folder: Path, config: dict) -> dict:
    """tokenizer_config.json's ``config`` with special_tokens_map.json's tokens over it, where transformers 5
    reads that file: checkpoints saved before transformers 4.34 (no ``added_tokens_decoder`` in the config;
    IDEFICS') name their pad token and additional special tokens there only."""
    path = folder / "special_tokens_map.json"
    if "added_tokens_decoder" in config or not path.is_file():
        return config
    return {**config, **read_json(path)}


def class_defaults(name: str) -> dict:
    """The settings a class takes when tokenizer_config.json leaves them out: LlamaTokenizer pads on the
    left and names <s>/</s>/<unk>, Qwen2Tokenizer names <|endoftext|> (its constructor's defaults)."""
    if name == "LlamaTokenizer":
        return {"padding_side": "left", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if name == "Qwen2Tokenizer":
        return {"padding_side": "right", **dict.fromkeys(("eos_token", "pad_token", "unk_token"), "<|endoftext|>")}
    return {"padding_side": "right"}


def apply_config_added_tokens(backend, config: dict) -> None:
    """Give the added tokens tokenizer_config.json's ``added_tokens_decoder`` lists the flags written there
    (lstrip, rstrip, normalized...), and split special tokens as text where ``split_special_tokens`` says so:
    transformers 5 adds those tokens again over tokenizer.json's, so the config's flags win."""
    flags = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    listed = config.get("added_tokens_decoder")
    if isinstance(listed, dict):
        try:
            tokens = [AddedToken(**{k: v for k, v in t.items() if k in flags}) for _, t in
                      sorted(listed.items(), key=lambda item: int(item[0])) if isinstance(t, dict) and t.get("content")]
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"tokenizer_config.json: added_tokens_decoder is malformed ({err}); it maps token "
                                  f"ids to {{\"content\": ..., \"special\": ...}}: copy the checkpoint's file again") from None
        backend.add_tokens(tokens)
    backend.encode_special_tokens = bool(config.get("split_special_tokens"))


def apply_class_special_tokens(backend, name: str, special_tokens: list[str]) -> None:
    """Qwen2Tokenizer's constructor ends by adding its special tokens (image_token... included) again with
    the default flags (no lstrip/rstrip), over what tokenizer_config.json's added_tokens_decoder says."""
    if name == "Qwen2Tokenizer":
        backend.add_tokens([AddedToken(token, special=True) for token in special_tokens])


def _llama(backend, config: dict) -> None:
    # add_prefix_space (default true) and legacy (default false) choose where "▁" is prepended:
    # transformers' _get_prepend_scheme
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy") else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    _set_bpe(backend, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None, fuse_unk=True,
             byte_fallback=True)


def _qwen2(backend, config: dict) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")), use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _set_bpe(backend, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
             byte_fallback=False)


def _set_bpe(backend, **options) -> None:
    """The BPE options the class's constructor passes (dropout off, ignore_merges off, as its defaults)."""
    model = backend.model
    if type(model).__name__ != "BPE":  # the class builds a BPE from the file's vocabulary; keep what is there
        return
    for key, value in {"dropout": None, "ignore_merges": False, **options}.items():
        setattr(model, key, value)


_REBUILDS = {"LlamaTokenizer": _llama, "Qwen2Tokenizer": _qwen2}


def load_settings(settings: dict) -> dict:
    """from_pretrained's tokenizer keywords as tokenizer_config.json would hold them: a special token (a
    ``*_token`` keyword, or a list of unnamed ones) as its text; anything but text is an error naming it."""
    settings = dict(settings)
    for key, value in settings.items():
        if key.endswith("_token") and value is not None:
            settings[key] = _token_text(key, value)
        elif key in _UNNAMED_SPECIAL_TOKENS and value is not None:
            settings[key] = [_token_text(key, t) for t in (value if isinstance(value, (list, tuple)) else [value])]
    return settings


def with_settings(config: dict, settings: dict) -> tuple[dict, dict]:
    """(tokenizer_config.json's ``config`` with from_pretrained's ``settings`` over it, the settings that count): a
    keyword's additional_special_tokens counts only where the config lists no extra_special_tokens, which
    transformers 5 reads first."""
    if config.get("extra_special_tokens") and "extra_special_tokens" not in settings:
        settings = {k: v for k, v in settings.items() if k != "additional_special_tokens"}
    return {**config, **settings}, settings


def _token_text(key: str, token) -> str:
    text = token.content if isinstance(token, AddedToken) else token
    if not isinstance(text, str) or not text:
        raise InputError(f"{key} must be a token's text (a non-empty string), got {token!r}")
    return text


def add_setting_tokens(backend, settings: dict) -> None:
    """Add the special tokens from_pretrained's keywords name that the vocabulary lacks (``pad_token="<pad>"``),
    as transformers does: named ones in its order, then the unnamed ones."""
    order = {key: index for index, key in enumerate(_SPECIAL_TOKEN_ORDER)}
    named = sorted((k for k in settings if k.endswith("_token") and settings[k]), key=lambda k: order.get(k, len(order)))
    tokens = [settings[k] for k in named] + [t for k in _UNNAMED_SPECIAL_TOKENS for t in settings.get(k) or []]
    missing = [t for t in dict.fromkeys(tokens) if backend.token_to_id(t) is None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def config_model_type(folder: Path) -> str | None:
    """config.json's model type (AutoTokenizer's choice of class reads it too), or None."""
    path = folder / "config.json"
    try:
        model_type = read_json(path).get("model_type") if path.is_file() else None
    except CheckpointError:  # a damaged config.json is reported by whatever loads the model
        return None
    return model_type if isinstance(model_type, str) else None
