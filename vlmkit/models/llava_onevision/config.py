"""LLaVA-OneVision configs from a llava-hf ``config.json`` (``model_type: llava_onevision``), or built by keyword
as transformers' classes of these names (every argument optional, with their defaults)."""

from dataclasses import field
from typing import ClassVar

from ...configs import ConfigFile, check_heads_divide, config_class, dataclass_from_dict, sub_config
from ...errors import CheckpointError
from ...nn.decoder import DecoderConfig

# transformers' LlavaOnevisionConfig default: anyres_max_9's pinpoints, multiples of 384 up to 6 x 384.
DEFAULT_GRID_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# What the reference builds when a config has no vision_config at all (SigLIP-so400m less its last
# layer); a vision_config dict that is present, even empty, falls back on SigLIP's own defaults instead.
ONEVISION_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                                 num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)


@config_class
class SiglipVisionConfig(ConfigFile):
    """The SigLIP tower; defaults are ``SiglipVisionConfig``'s."""

    model_type: ClassVar[str] = "siglip_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def grid_size(self) -> int:
        """Patches per side. The convolution drops the remainder: so400m's 384 px / 14 px gives 27."""
        return self.image_size // self.patch_size


# transformers 5's names for the placeholder token ids (its attribute map), beside the config.json keys
TOKEN_ID_ALIASES = (("image_token_id", "image_token_index"), ("video_token_id", "video_token_index"))


@config_class
class LlavaOnevisionConfig(ConfigFile):
    """The whole model: Qwen2 text side, SigLIP tower, projector and the anyres settings. Each section may be
    given as its config object, a dict or a transformers config (positionally too, vision first, as
    transformers 4's documentation writes ``LlavaOnevisionConfig(vision_config, text_config)``); one left out
    takes the defaults transformers gives it (``Qwen2Config``'s; SigLIP-so400m's tower less its last layer)."""

    model_type: ClassVar[str] = "llava_onevision"  # transformers' name for the family (config.model_type)

    vision_config: SiglipVisionConfig | None = None
    text_config: DecoderConfig | None = None
    image_token_index: int = 151646
    video_token_index: int = 151647
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "full"
    vision_feature_layer: int | list[int] = -1
    vision_aspect_ratio: str = "anyres_max_9"
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_GRID_PINPOINTS])
    tie_word_embeddings: bool = False
    multimodal_projector_bias: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for alias, key in TOKEN_ID_ALIASES:  # by keyword under transformers 5's attribute names
            if alias in self.extra:
                setattr(self, key, self.extra.pop(alias))
        self.vision_config = sub_config(self.vision_config, SiglipVisionConfig, lambda v: _vision_config(v, None),
                                        "LlavaOnevisionConfig", "vision_config")
        # Qwen2: the reference's default backbone
        self.text_config = sub_config(self.text_config, DecoderConfig,
                                      lambda v: DecoderConfig.from_text_config(v, "qwen2", where=None),
                                      "LlavaOnevisionConfig", "text_config")
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in DEFAULT_GRID_PINPOINTS]
        # as transformers: a text config that ties its embeddings ties them for the whole model
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise CheckpointError(f"vision_feature_select_strategy must be 'default' or 'full', "
                                  f"got {self.vision_feature_select_strategy!r}")
        parse_max_num_patches(self.vision_aspect_ratio)  # an unknown setting fails as the config is read

    def get_text_config(self, decoder: bool = True) -> DecoderConfig:
        """The language model's config, as transformers' ``get_text_config`` returns it."""
        return self.text_config

    @classmethod
    def from_dict(cls, values: dict) -> "LlavaOnevisionConfig":
        """From a transformers-layout ``config.json`` dict."""
        if values.get("model_type") != "llava_onevision":
            raise CheckpointError(f"not a LLaVA-OneVision config (model_type {values.get('model_type')!r})")
        values = dict(values)
        # transformers 5 may write the token ids under their attribute-map names
        for alias, key in TOKEN_ID_ALIASES:  # the config.json key wins where a file has both
            alias_value = values.pop(alias, None)
            if values.get(key) is None and alias_value is not None:
                values[key] = alias_value
        return dataclass_from_dict(
            cls, values, "config.json",
            text_config=DecoderConfig.from_text_config(values.get("text_config"), "qwen2"),
            vision_config=_vision_config(values.get("vision_config")),
        )

    def check_sizes(self) -> None:
        """Refuse settings the forward would fail on with the first image: the feature layers must be among
        the tower's hidden states (its embeddings and one per layer, indexed from either end), and the tower's
        width split evenly over its heads. (The projector is sized from both sides' widths, so those always
        meet.) Called when a model is built."""
        vision = self.vision_config
        states = vision.num_hidden_layers + 1
        outside = [layer for layer in self.feature_layers if not -states <= layer < states]
        if outside:
            raise CheckpointError(f"config.json: vision_feature_layer {self.vision_feature_layer} names hidden "
                                  f"state(s) {outside} the tower does not have: with "
                                  f"vision_config.num_hidden_layers {vision.num_hidden_layers} it has {states} "
                                  f"(0..{states - 1}, or -1..-{states}); fix one of the two in the file")
        check_heads_divide("config.json: vision_config.hidden_size", vision.hidden_size,
                           "vision_config.num_attention_heads", vision.num_attention_heads, "the vision attention")

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def video_token_id(self) -> int:
        return self.video_token_index

    @property
    def feature_layers(self) -> list[int]:
        """The vision hidden-state indices whose features are concatenated (0 = patch embeddings)."""
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @property
    def max_num_patches(self) -> int:
        """The N of ``anyres_max_N``: images whose unpadded feature map holds more than about N tiles'
        worth of features are downsampled."""
        return parse_max_num_patches(self.vision_aspect_ratio)


def _vision_config(values: dict | None, where: str | None = "config.json: vision_config") -> SiglipVisionConfig:
    """The tower's config as the reference builds it: none at all is ``ONEVISION_VISION_DEFAULTS``; a dict,
    even an empty one, is completed by SigLIP's own defaults. ``where``: the file section the dict was read
    from (its values are then checked as a checkpoint's), None for one given by keyword."""
    if values is None:
        return dataclass_from_dict(SiglipVisionConfig, ONEVISION_VISION_DEFAULTS)
    if not isinstance(values, dict):
        dataclass_from_dict(SiglipVisionConfig, values, where)  # raises, naming the section
    model_type = values.get("model_type") or "siglip_vision_model"
    if model_type != "siglip_vision_model":
        raise CheckpointError(f"vision_config model_type {model_type!r} is not supported; vlmkit runs "
                              "LLaVA-OneVision with its SigLIP tower ('siglip_vision_model')")
    return dataclass_from_dict(SiglipVisionConfig, values, where)


def parse_max_num_patches(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9 (the reference strips the characters of ``anyres_max_``)."""
    try:
        return int(str(vision_aspect_ratio).strip("anyres_max_"))
    except ValueError:
        raise CheckpointError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported; "
                              "LLaVA-OneVision checkpoints use 'anyres_max_N', e.g. 'anyres_max_9'") from None
