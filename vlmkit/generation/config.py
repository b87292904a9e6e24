"""Generation settings with transformers' names and defaults, read from ``generation_config.json``."""

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..configs import dataclass_from_dict
from ..errors import InputError
from ..io.checkpoint import read_json


@dataclass
class GenerationConfig:
    """What ``generate`` does; any field can be overridden per call by keyword."""

    max_new_tokens: int | None = None
    max_length: int = 20
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
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict) -> "GenerationConfig":
        return dataclass_from_dict(cls, values)

    @classmethod
    def from_pretrained(cls, folder: Path, **defaults) -> "GenerationConfig":
        """``generation_config.json`` when present, over ``defaults`` (e.g. ids from the model config)."""
        values = dict(defaults)
        path = Path(folder) / "generation_config.json"
        if path.is_file():
            values.update({k: v for k, v in read_json(path).items() if v is not None})
        return cls.from_dict(values)

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with ``overrides`` applied; an unknown option is an error naming it."""
        known = {f.name for f in fields(self)} - {"extra"}
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            raise InputError(f"unknown generation option(s): {', '.join(unknown)}")
        config = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        config.validate()
        return config

    def validate(self) -> None:
        """Reject settings that cannot work, with the reason."""
        if self.num_beams != 1:
            raise InputError("beam search is not supported; use num_beams=1")
        if self.do_sample and self.temperature is not None and self.temperature <= 0:
            raise InputError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
        if not 0 < (self.top_p if self.top_p is not None else 1.0) <= 1:
            raise InputError("top_p must be in (0, 1]")
        if self.num_return_sequences < 1:
            raise InputError("num_return_sequences must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise InputError("max_new_tokens must be >= 0")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def new_token_budget(self, prompt_length: int) -> int:
        """How many tokens to generate: ``max_new_tokens``, else what ``max_length`` leaves."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(self.max_length - prompt_length, 0)
