"""Generation settings with transformers' names and defaults, read from ``generation_config.json``."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..configs import check_field_types, dataclass_from_dict
from ..errors import CheckpointError, InputError
from ..io.checkpoint import read_json
from .option_types import check_option_types, is_whole, token_id_list
from .watermark import watermark_settings

# the seeds torch.Generator.manual_seed takes: any 64-bit value, signed or unsigned
SEED_RANGE = (-(2**63), 2**64 - 1)

# what transformers generates when neither max_new_tokens nor max_length is set
DEFAULT_NEW_TOKENS = 20


@dataclass
class GenerationConfig:
    """What ``generate`` does; any field can be overridden per call by keyword."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # total length, prompt included; neither set: 20 new tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    use_cache: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # the logits pipeline (generation/logits.py), in transformers' meaning
    min_length: int = 0
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: list | dict | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    renormalize_logits: bool = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool = False
    min_p: float | None = None
    top_h: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    exponential_decay_length_penalty: tuple[int, float] | None = None
    max_time: float | None = None
    # the prompt's tokens drawn to (> 1) or away from (< 1); its n-grams not repeated (prompt_penalties.py)
    encoder_repetition_penalty: float = 1.0
    encoder_no_repeat_ngram_size: int = 0
    # a green-list watermark (watermark.py): transformers' WatermarkingConfig or a dict of its settings
    watermarking_config: dict | None = None
    low_memory: bool | None = None  # transformers' sequential beam search, which it no longer runs
    # transformers takes it as a generate() argument: (batch_id, input_ids [T]) -> allowed token ids
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = field(default=None, repr=False)
    # what generate returns
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict) -> "GenerationConfig":
        return dataclass_from_dict(cls, values)

    def to_json_dict(self) -> dict:
        """What ``generation_config.json`` holds for this config: the settings that differ from the defaults
        and can be written as JSON (callables such as ``prefix_allowed_tokens_fn`` cannot), the unknown
        keys it was read with kept."""
        defaults = type(self)()
        values = dict(self.extra)
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "extra" and value != getattr(defaults, item.name) and _is_json(value):
                values[item.name] = value
        return values

    def to_dict(self) -> dict:
        """Every setting by name (transformers' ``GenerationConfig.to_dict``)."""
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "extra"}
        return {**self.extra, **values}

    def to_diff_dict(self) -> dict:
        """The settings that differ from the defaults (transformers' ``to_diff_dict``): what is saved."""
        return self.to_json_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as JSON text (transformers' ``to_json_string``): with ``use_diff`` only what differs
        from the defaults, else every setting that JSON can hold."""
        values = self.to_diff_dict() if use_diff else {k: v for k, v in self.to_dict().items() if _is_json(v)}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    def update(self, **kwargs) -> dict:
        """Set the known options in place; returns the others (transformers' ``GenerationConfig.update``)."""
        known = {f.name for f in fields(self)} - {"extra"}
        checked = self.updated(**{k: v for k, v in kwargs.items() if k in known})
        for name in known & kwargs.keys():
            setattr(self, name, getattr(checked, name))
        return {k: v for k, v in kwargs.items() if k not in known}

    def save_pretrained(self, save_directory) -> Path:
        """Write ``generation_config.json`` into ``save_directory`` (what ``from_pretrained`` reads back)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "generation_config.json"
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, folder: Path, **defaults) -> "GenerationConfig":
        """``generation_config.json`` when present, over ``defaults`` (e.g. ids from the model config)."""
        values = dict(defaults)
        path = Path(folder) / "generation_config.json"
        if not path.exists():
            return cls.from_dict(values)
        read = {k: v for k, v in read_json(path).items() if v is not None}
        known = {f.name for f in fields(cls)} - {"extra"}
        # checked as they are read, so a bad file fails at load naming itself, not at the first generate
        check_field_types(cls, {k: v for k, v in read.items() if k in known}, str(path))
        config = cls.from_dict({**values, **read})
        try:
            config.validate()
        except InputError as err:
            raise CheckpointError(f"{path}: {err}; fix or remove that setting in the file") from None
        return config

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with ``overrides`` applied; an unknown option is an error naming it."""
        known = {f.name for f in fields(self)} - {"extra"}
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            raise InputError(f"unknown generation option(s): {', '.join(unknown)}")
        config = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        config.validate()
        if config.watermarking_config is not None:  # kept as its settings, which save_pretrained can write
            config.watermarking_config = watermark_settings(config.watermarking_config)
        return config

    def validate(self) -> None:
        """Reject settings that cannot work, with the reason."""
        check_option_types(self)  # first: the checks below compare the values with numbers
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise InputError(f"{option.name} must be a finite number, got {value}")
        if self.seed is not None and not (is_whole(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InputError(f"seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what a torch "
                             f"generator takes), got {self.seed!r}")
        if self.num_beams < 1:
            raise InputError("num_beams must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise InputError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if self.early_stopping not in (True, False, "never"):
            raise InputError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        for name in ("min_length", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"{name} must be an integer >= 0")
        if self.min_new_tokens is not None and (not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0):
            raise InputError("min_new_tokens must be an integer >= 0")
        if self.prefix_allowed_tokens_fn is not None and not callable(self.prefix_allowed_tokens_fn):
            raise InputError("prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> allowed token ids")
        if self.do_sample:  # the sampling filters: unread without sampling, as in transformers
            self._validate_sampling_filters()
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise InputError(f"{name} must be > 0 (1.0 means no penalty)")
        if self.watermarking_config is not None:
            watermark_settings(self.watermarking_config)
        if self.low_memory and self.num_beams > 1:
            raise InputError("low_memory=True (sequential beam search) is not run by transformers 5 nor vlmkit; "
                             "leave it unset")
        if self.return_dict_in_generate and (self.output_attentions or self.output_hidden_states):
            raise InputError("vlmkit does not return attentions or hidden states from generate; drop "
                             "output_attentions/output_hidden_states (call the model itself for them)")
        if self.num_return_sequences < 1:
            raise InputError("num_return_sequences must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be at least 1 (more than 0, as in transformers), got "
                             f"{self.max_new_tokens}")

    def _validate_sampling_filters(self) -> None:
        """What transformers' sampling filters refuse where it builds them (warpers.py builds them alike): a
        top_p or typical_p of 1 or more, and an epsilon or eta cutoff outside (0, 1), mean no filter."""
        if self.temperature is not None and self.temperature <= 0:
            raise InputError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
        if self.top_p is not None and self.top_p < 0:  # 0 keeps the likeliest token only
            raise InputError("top_p must be in [0, 1] (1: no filter)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError("min_p must be in [0, 1]")
        if self.top_h is not None and not 0 < self.top_h <= 1:
            raise InputError("top_h must be in (0, 1]")
        if self.typical_p is not None and self.typical_p <= 0:
            raise InputError("typical_p must be in (0, 1] (1: no filter)")

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in token_id_list(self.eos_token_id)]

    def new_token_budget(self, prompt_length: int, max_context: int | None = None) -> int:
        """How many tokens to generate: ``max_new_tokens``, else what ``max_length`` leaves, else
        transformers' default of 20; the last two no further than the model's context (``max_length`` is a
        cap, and checkpoints set it past their context: the answer then ends where the context does).
        A fractional length rounds up: transformers stops once the length reaches it."""
        if self.max_new_tokens is not None:
            return math.ceil(self.max_new_tokens)
        room = (max_context or 1 << 62) - prompt_length
        if self.max_length is not None:
            return max(min(math.ceil(self.max_length - prompt_length), room), 0)
        return max(min(DEFAULT_NEW_TOKENS, room), 0)

    def check_room(self, prompt_length: int) -> None:
        """An error when ``max_length`` (with no ``max_new_tokens``) leaves nothing to generate, as
        transformers' generate refuses it, rather than handing the prompt back as the answer."""
        if self.max_new_tokens is None and self.max_length is not None and prompt_length >= self.max_length:
            raise InputError(f"input length of input_ids is {prompt_length}, but max_length is set to "
                             f"{self.max_length}, which leaves nothing to generate; increase max_length or, "
                             f"better yet, set max_new_tokens")


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
