"""What ``from_pretrained(quantization_config=...)`` accepts and what a checkpoint's ``config.json`` may
say about its own quantization: transformers' ``BitsAndBytesConfig`` (the 8-bit and 4-bit path of the transformers docs)
and vlmkit's weight-only int8/int4 (``WeightOnlyConfig``, asked for as ``"int8"``/``"int4"``).

Everything here is checked before a single weight is read, so a bad request fails at once."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STORAGE_NAMES = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float32": torch.float32, "float64": torch.float64}


def _dtype(value, names: dict, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in names.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in names:
        return names[value.removeprefix("torch.")]
    raise InputError(f"{what} must be one of {', '.join(sorted(set(names)))}, got {value!r}")


class BitsAndBytesConfig:
    """transformers' ``BitsAndBytesConfig``, with the same arguments and defaults: ``load_in_8bit``
    (LLM.int8(): ``llm_int8_threshold``, ``llm_int8_has_fp16_weight``) or ``load_in_4bit``
    (``bnb_4bit_quant_type`` "fp4"/"nf4", ``bnb_4bit_compute_dtype``, ``bnb_4bit_use_double_quant``,
    ``bnb_4bit_quant_storage``); ``llm_int8_skip_modules`` lists modules kept in full precision
    (for 4-bit too, despite the name). Loading with it needs ``pip install 'vlmkit[bnb]'``."""

    quant_method = "bitsandbytes"

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: list[str] | None = None, llm_int8_enable_fp32_cpu_offload: bool = False,
                 llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype=None,
                 bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                 bnb_4bit_quant_storage=None, **unused):
        for name, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit),
                            ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
                            ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
                            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)):
            if not isinstance(value, bool):
                raise InputError(f"BitsAndBytesConfig: {name} must be True or False, got {value!r}")
        if load_in_8bit and load_in_4bit:
            raise InputError("BitsAndBytesConfig: load_in_8bit and load_in_4bit are both True; choose one")
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise InputError(f"BitsAndBytesConfig: bnb_4bit_quant_type must be 'fp4' or 'nf4', "
                             f"got {bnb_4bit_quant_type!r}")
        if llm_int8_skip_modules is not None and not (isinstance(llm_int8_skip_modules, (list, tuple)) and
                                                      all(isinstance(m, str) for m in llm_int8_skip_modules)):
            raise InputError("BitsAndBytesConfig: llm_int8_skip_modules must be a list of module names")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            # float() would take "6" and refuse None with a bare TypeError; transformers wants a number too
            raise InputError(f"BitsAndBytesConfig: llm_int8_threshold must be a number, got {llm_int8_threshold!r}")
        self.load_in_8bit, self.load_in_4bit = load_in_8bit, load_in_4bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = list(llm_int8_skip_modules) if llm_int8_skip_modules is not None else None
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        # transformers' default compute dtype is float32 (slow but safe); the IDEFICS model card asks for float16
        self.bnb_4bit_compute_dtype = torch.float32 if bnb_4bit_compute_dtype is None else \
            _dtype(bnb_4bit_compute_dtype, _DTYPE_NAMES, "bnb_4bit_compute_dtype")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = torch.uint8 if bnb_4bit_quant_storage is None else \
            _dtype(bnb_4bit_quant_storage, _STORAGE_NAMES, "bnb_4bit_quant_storage")

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4

    def quantization_method(self) -> str | None:
        """"llm_int8", "fp4" or "nf4" (transformers' names), or None when neither width is asked for."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def to_dict(self) -> dict:
        """The ``quantization_config`` entry of a saved ``config.json``, as transformers writes it."""
        return {"_load_in_4bit": self.load_in_4bit, "_load_in_8bit": self.load_in_8bit,
                "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).removeprefix("torch."),
                "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).removeprefix("torch."),
                "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
                "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
                "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
                "llm_int8_skip_modules": copy.copy(self.llm_int8_skip_modules),
                "llm_int8_threshold": self.llm_int8_threshold, "load_in_4bit": self.load_in_4bit,
                "load_in_8bit": self.load_in_8bit, "quant_method": self.quant_method}

    @classmethod
    def from_dict(cls, values: dict) -> BitsAndBytesConfig:
        values = {k.removeprefix("_"): v for k, v in values.items() if k != "quant_method"}
        return cls(**values)

    def __repr__(self) -> str:
        return f"BitsAndBytesConfig({self.to_dict()})"


@dataclass(frozen=True)
class WeightOnlyConfig:
    """vlmkit's own weight-only quantization: int8 with one scale per output channel (``group_size``
    None), or int4 in groups of ``group_size`` input channels with a scale and a zero point each."""

    bits: int
    group_size: int | None = None

    quant_method = "vlmkit"
    FORMAT_VERSION = 1

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise InputError(f"vlmkit quantizes weights to 8 or 4 bits, not {self.bits}")
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise InputError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size!r}")
        if self.bits == 8 and self.group_size is not None:
            raise InputError("int8 uses one scale per output channel: group_size must be None")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "bits": self.bits, "group_size": self.group_size,
                "format_version": self.FORMAT_VERSION}

    @classmethod
    def from_dict(cls, values: dict) -> WeightOnlyConfig:
        version = values.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise InputError(f"vlmkit quantization_config: format_version must be a whole number such as "
                             f"{cls.FORMAT_VERSION}, got {version!r}")
        if version > cls.FORMAT_VERSION:
            raise CheckpointError(f"this checkpoint's vlmkit quantization format {version} is newer than this "
                                  f"vlmkit reads ({cls.FORMAT_VERSION}); upgrade vlmkit")
        bits = values.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise InputError(f"vlmkit quantization_config: bits must be 8 or 4, got {bits!r}")
        return cls(bits, values.get("group_size"))


NAMED = {"int8": WeightOnlyConfig(8), "int4": WeightOnlyConfig(4, 128)}
QuantizationConfig = BitsAndBytesConfig | WeightOnlyConfig


def parse_quantization_config(value) -> QuantizationConfig | None:
    """What a user passed as ``quantization_config=`` (or ``--quantize``): None, "int8"/"int4", a
    ``BitsAndBytesConfig`` (vlmkit's or transformers'), a ``WeightOnlyConfig``, or a dict as saved in a
    checkpoint's ``config.json``."""
    if value is None or isinstance(value, (BitsAndBytesConfig, WeightOnlyConfig)):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("", "none", "bf16", "bfloat16", "off"):
            return None
        if name in NAMED:
            return NAMED[name]
        raise InputError(f"unknown quantization {value!r}: vlmkit's own are 'int8' and 'int4'; for bitsandbytes "
                         f"pass BitsAndBytesConfig(load_in_8bit=True) or BitsAndBytesConfig(load_in_4bit=True)")
    if type(value).__name__ == "BitsAndBytesConfig" and hasattr(value, "to_dict"):  # transformers' own class
        return BitsAndBytesConfig.from_dict(value.to_dict())
    if isinstance(value, dict):
        method = value.get("quant_method")
        if method == "bitsandbytes":
            return BitsAndBytesConfig.from_dict(value)
        if method == "vlmkit":
            return WeightOnlyConfig.from_dict(value)
        raise InputError(f"quantization_config with quant_method {method!r} is not supported: vlmkit quantizes "
                         f"with 'bitsandbytes' (BitsAndBytesConfig) or its own 'int8'/'int4'")
    raise InputError(f"quantization_config must be 'int8', 'int4', a BitsAndBytesConfig or a dict, "
                     f"got {type(value).__name__}")


def checkpoint_quantization(raw_config: dict, folder) -> QuantizationConfig | None:
    """How the checkpoint in ``folder`` is already quantized (its config.json's ``quantization_config``),
    or None for full-precision weights. Formats vlmkit cannot read are an error naming them."""
    saved = raw_config.get("quantization_config")
    if not saved:
        return None
    method = saved.get("quant_method") if isinstance(saved, dict) else None
    if method not in ("bitsandbytes", "vlmkit"):
        raise CheckpointError(f"{folder} is already quantized with {method or 'an unknown method'!r}; vlmkit reads "
                              f"full-precision checkpoints, bitsandbytes ones and its own int8/int4: load the "
                              f"original full-precision weights instead")
    try:
        config = parse_quantization_config(saved)
        if isinstance(config, BitsAndBytesConfig) and config.quantization_method() is None:
            raise InputError("BitsAndBytesConfig: neither load_in_8bit nor load_in_4bit is true")
    except (InputError, CheckpointError) as err:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: unreadable quantization_config: {err}. Fix that "
                              f"value, or take quantization_config out of config.json if the weights are full "
                              f"precision") from None
    return config


def resolve_quantization(requested, raw_config: dict, folder) -> tuple[QuantizationConfig | None, bool]:
    """(quantization to apply, whether the checkpoint already holds it quantized), from the user's
    ``quantization_config`` and the checkpoint's own. Asking for a different format than the one a
    checkpoint is stored in is an error: vlmkit does not re-quantize quantized weights."""
    asked = parse_quantization_config(requested)
    stored = checkpoint_quantization(raw_config, folder)
    if stored is None:
        return asked, False
    if not _weights_quantized(folder, stored):
        # config.json alone must not decide: quantized layers built over float weights would load nothing
        if asked is not None:
            return asked, False  # quantized at load, as asked; the stale config entry is ignored
        raise CheckpointError(f"{Path(folder) / 'config.json'} says the weights are quantized ({_describe(stored)}), "
                              f"but they are not: the checkpoint holds none of its {_MARKER_TEXT[_marker(stored)]} "
                              f"tensors. Remove quantization_config from config.json to load them in full "
                              f"precision, or pass quantization_config= to quantize them at load")
    if asked is not None and not _same_format(asked, stored):
        raise InputError(f"{folder} is already quantized as {_describe(stored)}; it cannot be loaded as "
                         f"{_describe(asked)}. Drop quantization_config (the stored format is used), or load the "
                         f"full-precision checkpoint to quantize it another way")
    return stored, True


# a tensor-name ending that each stored format writes for every quantized layer
_MARKERS = {"vlmkit": ".weight_scale", "llm_int8": ".SCB", "4bit": ".weight.quant_state.bitsandbytes__"}
_MARKER_TEXT = {"vlmkit": "weight_scale", "llm_int8": "SCB", "4bit": "weight.quant_state"}


def _marker(config: QuantizationConfig) -> str:
    if isinstance(config, WeightOnlyConfig):
        return "vlmkit"
    return "llm_int8" if config.quantization_method() == "llm_int8" else "4bit"


def _weights_quantized(folder, stored: QuantizationConfig) -> bool:
    """Whether the weights in ``folder`` hold any layer quantized in the ``stored`` format (names only:
    safetensors headers are read, no tensor data)."""
    from ..io.checkpoint import iter_checkpoint_names, weight_files
    key = _marker(stored)
    marker = _MARKERS[key]
    found = (name.endswith(marker) if key != "4bit" else marker in name
             for name in iter_checkpoint_names(weight_files(Path(folder))))
    return any(found)


def _same_format(a: QuantizationConfig, b: QuantizationConfig) -> bool:
    if isinstance(a, WeightOnlyConfig) or isinstance(b, WeightOnlyConfig):
        return a == b
    if isinstance(a, BitsAndBytesConfig) and isinstance(b, BitsAndBytesConfig):
        return a.quantization_method() == b.quantization_method()
    return False


def _describe(config: QuantizationConfig) -> str:
    if isinstance(config, WeightOnlyConfig):
        return f"vlmkit {config.name}"
    return f"bitsandbytes {config.quantization_method()}"
