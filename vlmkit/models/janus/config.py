"""Janus / Janus-Pro configs from a transformers-layout ``config.json`` (``model_type: janus``), or built by
keyword as transformers' classes of these names (every argument optional, with their defaults)."""

from dataclasses import field
from typing import ClassVar

from ...configs import ConfigFile, check_heads_divide, config_class, dataclass_from_dict, sub_config
from ...errors import CheckpointError
from ...nn.decoder import DecoderConfig


@config_class
class JanusVisionConfig(ConfigFile):
    """The SigLIP understanding tower and its aligner MLP."""

    model_type: ClassVar[str] = "janus_vision_model"

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    image_size: int = 384
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    mlp_ratio: float = 4.0
    attention_bias: bool = True
    use_qk_norm: bool = False
    projection_dim: int = 2048
    depth: int = 2
    num_image_tokens: int = 576
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@config_class
class JanusVQVAEConfig(ConfigFile):
    """The VQ-VAE that turns image tokens into pixels, with the generation embedding/aligner/head sizes."""

    model_type: ClassVar[str] = "janus_vqgan"

    embed_dim: int = 8
    num_embeddings: int = 16384
    double_latent: bool = False
    latent_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    projection_dim: int = 2048
    num_hidden_layers: int = 2
    hidden_act: str = "gelu"
    image_token_embed_dim: int = 2048
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent (and image token) along a side: the encoder halves per level after the first."""
        return 2 ** (len(self.channel_multiplier) - 1)


@config_class
class JanusConfig(ConfigFile):
    """The whole model: LLaMA text side, vision tower, VQ-VAE and the image token id. Each section may be
    given as its config object, a dict or a transformers config; one left out takes its class's defaults
    (the text side ``LlamaConfig``'s, or those of the class its ``model_type`` names)."""

    model_type: ClassVar[str] = "janus"  # transformers' name for the family (config.model_type)

    text_config: DecoderConfig | None = None
    vision_config: JanusVisionConfig | None = None
    vq_config: JanusVQVAEConfig | None = None
    image_token_id: int = 100581
    tie_word_embeddings: bool = True  # JanusConfig's default (a head missing from the checkpoint is tied anyway)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.text_config = sub_config(self.text_config, DecoderConfig,
                                      lambda v: DecoderConfig.from_text_config(v, "llama", where=None),
                                      "JanusConfig", "text_config")
        self.vision_config = sub_config(self.vision_config, JanusVisionConfig,
                                        lambda v: dataclass_from_dict(JanusVisionConfig, v), "JanusConfig",
                                        "vision_config")
        self.vq_config = sub_config(self.vq_config, JanusVQVAEConfig,
                                    lambda v: dataclass_from_dict(JanusVQVAEConfig, v), "JanusConfig", "vq_config")
        # as transformers' JanusConfig: the VQ decoder's latent grid follows the vision tower's patch grid
        if isinstance(self.vision_config.patch_size, int) and self.vision_config.patch_size > 0:
            self.vq_config.extra["num_patches"] = self.num_patches_per_side

    def get_text_config(self, decoder: bool = True) -> DecoderConfig:
        """The language model's config, as transformers' ``get_text_config`` returns it."""
        return self.text_config

    @classmethod
    def from_dict(cls, values: dict) -> "JanusConfig":
        """From a transformers-layout ``config.json`` dict."""
        if values.get("model_type") != "janus":
            raise CheckpointError(f"not a Janus config (model_type {values.get('model_type')!r})")
        config = dataclass_from_dict(
            cls, values, "config.json",
            text_config=DecoderConfig.from_text_config(values.get("text_config"), "llama"),
            vision_config=dataclass_from_dict(JanusVisionConfig, values.get("vision_config"),
                                              "config.json: vision_config"),
            vq_config=dataclass_from_dict(JanusVQVAEConfig, values.get("vq_config"), "config.json: vq_config"),
        )
        return config

    def check_sizes(self) -> None:
        """Refuse sections whose sizes do not meet where the forward joins them (transformers' modeling
        builds each part from its own section, so a checkpoint it saved can hold both): the aligners write
        into the language model's embedding width and the generation head reads its hidden states. Called
        when a model is built (reading the config alone, as ``AutoConfig``, refuses nothing of this).
        ``_key_names``: how the file spells these keys, where it is not config.json's transformers layout."""
        def name(key: str) -> str:
            return getattr(self, "_key_names", {}).get(key) or f"config.json: {key}"
        text = self.text_config.hidden_size
        joins = [("vision_config.projection_dim", self.vision_config.projection_dim,
                  "the vision aligner's output, written over the image placeholders' embeddings,"),
                 ("vq_config.projection_dim", self.vq_config.projection_dim,
                  "the generation aligner's output, the embeddings of generated image tokens,"),
                 ("vq_config.image_token_embed_dim", self.vq_config.image_token_embed_dim,
                  "the generation head's input, the language model's hidden states,")]
        for key, size, role in joins:
            if size != text:
                raise CheckpointError(
                    f"{name(key)} is {size} but {name('text_config.hidden_size')} is {text}; {role} must be as "
                    f"wide as the language model. The config's sections (and weights built from them) do not "
                    f"fit together: use the checkpoint's original config.json, or make the two sizes equal")
        vision = self.vision_config
        check_heads_divide(name("vision_config.hidden_size"), vision.hidden_size,
                           name("vision_config.num_attention_heads"), vision.num_attention_heads, "the vision attention")

    @property
    def num_patches_per_side(self) -> int:
        """The VQ latent grid side: image tokens form a square grid of this side."""
        return self.vision_config.image_size // self.vision_config.patch_size
