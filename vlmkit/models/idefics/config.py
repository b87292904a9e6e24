"""IDEFICS configs from a transformers-layout ``config.json`` (``model_type: idefics``).

The text side's keys sit at the top level of the file (LLaMA's names); the CLIP tower and the
perceiver resampler have their own sub-dicts. The classes are also built by keyword as transformers' of
these names (``IdeficsConfig(hidden_size=..., vision_config={...})``, every argument optional)."""

from dataclasses import field
from typing import ClassVar

from ...configs import ConfigFile, check_heads_divide, config_class, dataclass_from_dict, sub_config
from ...errors import CheckpointError
from ...nn.decoder import DecoderConfig

# IdeficsConfig's defaults for the text keys at the top level of its config.json (transformers 5.23), where
# they differ from DecoderConfig's LLaMA-like field defaults: LLaMA's special token ids, with pad 0.
IDEFICS_TEXT_DEFAULTS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# LLaMA keys transformers' IDEFICS decoder does not read: its attention has as many key/value heads as query heads,
# head_dim = hidden_size // num_attention_heads and no biases, nor has its MLP, whatever config.json says. They are
# kept (in ``extra``, written back by ``to_dict``) but not given to the decoder.
IDEFICS_UNREAD_TEXT_KEYS = ("num_key_value_heads", "head_dim", "attention_bias", "mlp_bias")

# What ``freeze_*_module_exceptions`` may name, as the reference maps them.
FREEZE_EXCEPTION_NAMES = ("LayerNorm", "Linear", "Embedding")


@config_class
class IdeficsVisionConfig(ConfigFile):
    """The CLIP ViT tower (class token, pre-LayerNorm); ``embed_dim`` is its width."""

    model_type: ClassVar[str] = "idefics_vision"

    embed_dim: int = 768
    image_size: int = 224
    intermediate_size: int = 5120
    patch_size: int = 14
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@config_class
class IdeficsPerceiverConfig(ConfigFile):
    """The perceiver resampler that compresses each image's patches to ``resampler_n_latents`` vectors."""

    model_type: ClassVar[str] = "idefics_perciever"  # sic, transformers' spelling

    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False
    extra: dict = field(default_factory=dict, repr=False)


@config_class
class IdeficsConfig(ConfigFile):
    """The whole model: LLaMA decoder plus gated cross-attention layers, vision tower, optional resampler.

    Built by keyword as transformers' (flat) ``IdeficsConfig``: the text keys (``vocab_size``, ``hidden_size``...)
    make ``text_config``; ``vision_config`` and ``perceiver_config`` may be config objects, dicts or None."""

    model_type: ClassVar[str] = "idefics"  # transformers' name for the family (config.model_type)

    text_config: DecoderConfig | None = None
    vision_config: IdeficsVisionConfig | None = None
    perceiver_config: IdeficsPerceiverConfig | None = None
    additional_vocab_size: int = 0
    alpha_type: str = "float"
    alpha_initializer: str = "zeros"
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    use_resampler: bool = False
    freeze_text_layers: bool = True
    freeze_text_module_exceptions: list = field(default_factory=list)
    freeze_lm_head: bool = False
    freeze_vision_layers: bool = True
    freeze_vision_module_exceptions: list = field(default_factory=list)
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.text_config is None:  # built by keyword: the text keys were passed flat (and kept in extra)
            text_keys = {k: v for k, v in self.extra.items() if k not in IDEFICS_UNREAD_TEXT_KEYS}
            _refuse_other_head_dim(self.extra)
            self.text_config = DecoderConfig.from_dict({**IDEFICS_TEXT_DEFAULTS, **text_keys,
                                                        "tie_word_embeddings": self.tie_word_embeddings})
            for key in DecoderConfig.__dataclass_fields__:  # now the text config's (a later edit goes there)
                if key not in IDEFICS_UNREAD_TEXT_KEYS:
                    self.extra.pop(key, None)
        self.vision_config = sub_config(self.vision_config, IdeficsVisionConfig,
                                        lambda v: dataclass_from_dict(IdeficsVisionConfig, v), "IdeficsConfig",
                                        "vision_config")
        self.perceiver_config = sub_config(self.perceiver_config, IdeficsPerceiverConfig,
                                           lambda v: dataclass_from_dict(IdeficsPerceiverConfig, v), "IdeficsConfig",
                                           "perceiver_config")
        self.freeze_text_module_exceptions = list(self.freeze_text_module_exceptions)
        self.freeze_vision_module_exceptions = list(self.freeze_vision_module_exceptions)
        self.validate()

    def get_text_config(self, decoder: bool = True) -> DecoderConfig:
        """The language model's config, as transformers' ``get_text_config`` returns it."""
        return self.text_config

    def __getattr__(self, name: str):
        # transformers' IdeficsConfig is flat: the LLaMA keys (vocab_size, hidden_size, pad_token_id...) are
        # its own attributes, so they are read from the text config
        if name.startswith("__") or name == "text_config":
            raise AttributeError(name)
        return getattr(self.text_config, name)

    def __setattr__(self, name: str, value) -> None:
        # ...and set there: ``config.pad_token_id = 0`` is what the decoder reads
        if name not in self.__dataclass_fields__ and name in DecoderConfig.__dataclass_fields__ \
                and "text_config" in self.__dict__:
            setattr(self.text_config, name, value)
        else:
            super().__setattr__(name, value)

    def to_dict(self) -> dict:
        """Flat, as IDEFICS' config.json: the text keys at the top level."""
        values = super().to_dict()
        text = values.pop("text_config")
        text.pop("model_type")  # the file's is "idefics"
        for key in IDEFICS_UNREAD_TEXT_KEYS:  # the file's own value (kept in extra), not the decoder's
            if key in values:
                text.pop(key, None)
        own = {k: values[k] for k in vars(self) if k in values}  # over the copies of its keys the text side keeps
        return {**values, **text, **own}

    @classmethod
    def from_dict(cls, values: dict) -> "IdeficsConfig":
        """From a transformers-layout ``config.json`` dict; the text keys are read from its top level."""
        if values.get("model_type") != "idefics":
            raise CheckpointError(f"not an IDEFICS config (model_type {values.get('model_type')!r})")
        text_keys = {k: v for k, v in values.items()
                     if k not in ("vision_config", "perceiver_config", *IDEFICS_UNREAD_TEXT_KEYS)}
        _refuse_other_head_dim(values)
        config = dataclass_from_dict(
            cls, values, "config.json",
            text_config=DecoderConfig.from_dict({**IDEFICS_TEXT_DEFAULTS, **text_keys}, "config.json"),
            vision_config=dataclass_from_dict(IdeficsVisionConfig, values.get("vision_config"),
                                              "config.json: vision_config"),
            perceiver_config=dataclass_from_dict(IdeficsPerceiverConfig, values.get("perceiver_config"),
                                                 "config.json: perceiver_config"),
        )
        return config

    def validate(self) -> None:
        """Reject settings the model cannot be built with, naming the key."""
        if self.alpha_type not in ("float", "vector"):
            raise CheckpointError(f"alpha_type must be 'float' or 'vector', got {self.alpha_type!r}")
        layers, interval = self.text_config.num_hidden_layers, self.cross_layer_interval
        # a cross-attention layer precedes every interval-th decoder layer; the reference builds
        # layers // interval of them, so a remainder would leave the last one missing.
        if interval < 1 or layers % interval:
            raise CheckpointError(f"num_hidden_layers ({layers}) must be a multiple of cross_layer_interval "
                                  f"({interval})")
        for key in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            unknown = [name for name in getattr(self, key) if name not in FREEZE_EXCEPTION_NAMES]
            if unknown:
                raise CheckpointError(f"{key} names unknown module type(s) {unknown}; "
                                      f"known: {list(FREEZE_EXCEPTION_NAMES)}")

    def check_sizes(self) -> None:
        """Refuse widths the reference's attention layers cannot split evenly over their heads (they raise
        at construction; the cross-attention and resampler are sized from the tower's width, so those always
        meet). Called when a model is built."""
        for width_key, width, heads_key, heads in (
                ("hidden_size", self.text_config.hidden_size, "num_attention_heads", self.text_config.num_attention_heads),
                ("vision_config.embed_dim", self.vision_config.embed_dim, "vision_config.num_attention_heads",
                 self.vision_config.num_attention_heads)):
            check_heads_divide(f"config.json: {width_key}", width, heads_key, heads)

    @property
    def num_cross_layers(self) -> int:
        return self.text_config.num_hidden_layers // self.cross_layer_interval

    @property
    def image_width(self) -> int:
        """Width of the image features cross-attention reads (the resampler keeps the tower's width)."""
        return self.vision_config.embed_dim


def _refuse_other_head_dim(values: dict) -> None:
    """A ``head_dim`` other than hidden_size // num_attention_heads: transformers' IDEFICS sizes its rotary
    embedding from it but its attention heads from the quotient, and fails at the first forward."""
    head_dim = values.get("head_dim")
    hidden, heads = values.get("hidden_size", 4096), values.get("num_attention_heads", 32)
    if head_dim is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in (head_dim, hidden, heads)):
        return
    if heads > 0 and head_dim != hidden // heads:
        raise CheckpointError(f"config.json: head_dim is {head_dim}, but IDEFICS' attention heads are hidden_size // "
                              f"num_attention_heads = {hidden // heads} wide (transformers' IDEFICS fails on this "
                              f"config too); remove head_dim from the file or set it to {hidden // heads}")
