"""Janus / Janus-Pro: a SigLIP tower whose patch features are aligned into a LLaMA decoder for
understanding, and a VQ-VAE codebook with its own embedding, aligner and head for writing images.

Module names are transformers', so its checkpoints load by name and ``state_dict`` is its own; DeepSeek's
original layout is mapped in ``original_layout.py``."""

import re

import torch
from torch import nn

from ...errors import CheckpointError, InputError
from ...generation.options import SET_TO_NONE
from ...io.checkpoint import WeightLayout
from ...nn.activations import get_activation
from ...nn.decoder import DecoderModel
from ...nn.feature_cache import FeatureCache
from ..base import ModelOutput, PretrainedVLM, causal_lm_loss, kept_positions
from .config import JanusConfig
from .vision import JanusVisionModel
from .vq import JanusVQVAE


class AlignerMLP(nn.Module):
    """fc1, then (act, linear) x (depth - 1): maps vision (or VQ code) features into the LM's width."""

    def __init__(self, in_features: int, out_features: int, depth: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.hidden_layers = nn.ModuleList(nn.Linear(out_features, out_features) for _ in range(1, depth))
        self.act = get_activation(activation)

    def forward(self, x):
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x


class GenerationHead(nn.Module):
    """Hidden state -> logits over the VQ codebook (replaces the LM head when writing images)."""

    def __init__(self, hidden_size: int, projection_dim: int, num_codes: int, activation: str):
        super().__init__()
        self.proj_out = nn.Linear(hidden_size, projection_dim)
        self.vision_head = nn.Linear(projection_dim, num_codes)
        self.act = get_activation(activation)

    def forward(self, x):
        return self.vision_head(self.act(self.proj_out(x)))


class JanusModel(nn.Module):
    def __init__(self, config: JanusConfig):
        super().__init__()
        vision, vq = config.vision_config, config.vq_config
        self.vision_model = JanusVisionModel(vision)
        self.aligner = AlignerMLP(vision.hidden_size, vision.projection_dim, vision.depth, vision.hidden_act)
        self.vqmodel = JanusVQVAE(vq, config.num_patches_per_side)
        self.generation_embeddings = nn.Embedding(vq.num_embeddings, vq.embed_dim)
        self.generation_aligner = AlignerMLP(vq.embed_dim, vq.projection_dim, vq.num_hidden_layers, vq.hidden_act)
        self.generation_head = GenerationHead(vq.image_token_embed_dim, vq.projection_dim, vq.num_embeddings,
                                              vq.hidden_act)
        self.language_model = DecoderModel(config.text_config)


# Understanding-only checkpoints may lack these; image generation then says so clearly.
GENERATION_WEIGHTS = (r"^model\.vqmodel\.", r"^model\.generation_")


def _require_whole_generation_group(model: nn.Module, generation_missing: list[str]) -> None:
    """Only a checkpoint without any generation tensor is understanding-only: one that lacks some of them is
    damaged (a lost shard, a failed export), and dropping the generation modules would hide that."""
    if not generation_missing:
        return
    missing = set(generation_missing)
    present = [n for n in model.state_dict() if any(re.search(p, n) for p in GENERATION_WEIGHTS) and n not in missing]
    if present:
        raise CheckpointError(
            f"the checkpoint holds {len(present)} image-generation tensors but lacks {len(missing)}: "
            f"{', '.join(sorted(missing)[:10])}{' ...' if len(missing) > 10 else ''}. Download it again (a shard "
            f"may be missing), or remove every model.vqmodel.* and model.generation_* tensor for an "
            f"understanding-only checkpoint")


class JanusForConditionalGeneration(PretrainedVLM):
    """Janus for image understanding (text out) and text-to-image generation (image tokens out)."""

    accepted_inputs = ("pixel_values", "images_emb_mask")
    ignored_inputs = PretrainedVLM.ignored_inputs + ("images_seq_mask", "sft_format")
    # guidance_scale (which Janus checkpoints set) is for image generation; text is generated without it,
    # as in transformers' Janus
    guides_text = False

    def __init__(self, config: JanusConfig):
        super().__init__()
        self.config = config
        self.model = JanusModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        # aligned features of recent images, by pixel content: a repeated image skips the vision tower
        self.vision_cache = FeatureCache()
        self.post_init()

    @classmethod
    def config_from_folder(cls, folder, raw_config: dict):
        """(config, weight layout) for a transformers-layout or DeepSeek original-layout folder."""
        model_type = raw_config.get("model_type")
        if model_type == "janus":
            layout = WeightLayout(optional=(r"^lm_head\.weight$",) + GENERATION_WEIGHTS)
            return JanusConfig.from_dict(raw_config), layout
        if model_type == "multi_modality":
            from .original_layout import original_config_and_layout
            return original_config_and_layout(folder, raw_config)
        raise CheckpointError(f"{folder} holds a {model_type!r} checkpoint, not Janus")

    def tie_missing_weights(self, missing: set[str]) -> None:
        super().tie_missing_weights(missing)
        generation_missing = [m for m in missing if any(re.search(p, m) for p in GENERATION_WEIGHTS)]
        _require_whole_generation_group(self, generation_missing)
        self.has_generation_weights = not generation_missing
        if generation_missing:  # drop the unloaded generation modules instead of keeping meta tensors
            for name in ("vqmodel", "generation_embeddings", "generation_aligner", "generation_head"):
                setattr(self.model, name, None)

    def require_generation_weights(self) -> None:
        if not getattr(self, "has_generation_weights", True):
            raise InputError(f"{getattr(self, 'name_or_path', 'this checkpoint')} has no image-generation weights "
                             "(VQ-VAE, generation embedding/aligner/head): it can only answer about images")

    @classmethod
    def default_generation_config(cls, folder, config):
        generation_config = super().default_generation_config(folder, config)
        extra = generation_config.extra
        if "boi_token_id" not in extra and "boi_token_id" not in (extra.get("generation_kwargs") or {}):
            from ...io.tokenizer import added_token_id
            token_id = added_token_id(folder, "<begin_of_image>")
            if token_id is not None:
                extra["boi_token_id"] = token_id
        return generation_config

    @property
    def text_model(self) -> DecoderModel:
        return self.model.language_model

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id,)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # --- understanding -------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Aligned vision features [num_images, num_image_tokens, hidden] for pixels [num_images, 3, H, W]."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim == 5:  # the original processor batches as [batch, images, 3, H, W]
            pixel_values = pixel_values.flatten(0, 1)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(f"pixel_values must be shaped [num_images, 3, {size}, {size}], "
                             f"got {tuple(pixel_values.shape)}")
        return self.vision_cache.features(pixel_values.to(self.dtype), self._encode_images,
                                          (self.model.vision_model, self.model.aligner))

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.aligner(self.model.vision_model(pixel_values))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     images_emb_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's features written over its image-token positions.
        ``pixel_values`` [num_images, 3, H, W], or the original processor's [batch, max_images, 3, H, W]
        with ``images_emb_mask`` marking which of those images are real."""
        return self._embed_with_features(input_ids, pixel_values, images_emb_mask)[0]

    def _embed_with_features(self, input_ids, pixel_values, images_emb_mask):
        """(``embed_inputs``' embeddings, the image features written in [images * tokens, hidden] or None)."""
        if pixel_values is not None and pixel_values.ndim == 5 and images_emb_mask is not None:
            pixel_values = pixel_values[images_emb_mask.any(-1).to(pixel_values.device)]
            if pixel_values.shape[0] == 0:  # only the masked-off slot a batch without images carries
                pixel_values = None
        embeds = self.text_model.embed_tokens(input_ids)
        image_positions = input_ids == self.config.image_token_id
        num_slots = int(image_positions.sum())
        if pixel_values is None:
            if num_slots:
                raise InputError(f"the prompt holds {num_slots} image tokens but no pixel_values were given")
            return embeds, None
        features = self.get_image_features(pixel_values)
        if features.shape[0] * features.shape[1] != num_slots:
            raise InputError(f"the prompt holds {num_slots} image tokens but {features.shape[0]} image(s) of "
                             f"{features.shape[1]} tokens each were given; each image needs one placeholder")
        features = features.reshape(-1, features.shape[-1])
        embeds = embeds.clone()
        embeds[image_positions] = features.to(embeds.dtype)
        return embeds, features

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, cache_position=None, inputs_embeds=None, use_cache=None, labels=None,
                logits_to_keep: int = 0, generation_mode: str = "text", images_emb_mask=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **unused) -> ModelOutput:
        """Logits over the text vocabulary (or, with ``generation_mode="image"``, over image codes for
        ``input_ids`` that are image tokens after the prompt); ``labels`` give the loss. The cache options,
        ``output_hidden_states`` and ``return_dict`` are transformers' (see ``PretrainedVLM.run_text_model``);
        ``image_hidden_states`` are the aligned image features [images * tokens, hidden]."""
        image_features = None
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("forward needs input_ids or inputs_embeds")
            inputs_embeds, image_features = self._embed_with_features(input_ids, pixel_values, images_emb_mask)
        hidden, cache, all_hidden = self.run_text_model(
            inputs_embeds, attention_mask, position_ids, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions)
        hidden = kept_positions(hidden, logits_to_keep)
        logits = self.lm_logits(hidden) if generation_mode == "text" else self.model.generation_head(hidden)
        loss = causal_lm_loss(logits, labels, num_items_in_batch=unused.get("num_items_in_batch")) \
            if labels is not None else None
        return self.forward_output(return_dict, loss=loss, logits=logits, past_key_values=cache,
                                   hidden_states=all_hidden, image_hidden_states=image_features,
                                   last_hidden_state=hidden)

    def generate(self, input_ids=None, attention_mask=None, generation_mode: str = "text", **kwargs):
        """Text generation (``generation_mode="text"``) or image tokens (``"image"``, see ``generate_image``)."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # transformers' name for the first argument
        if generation_mode == "text":
            kwargs.pop("guidance_scale", None)  # as transformers' Janus: guidance is for images only
            # transformers' Janus keeps the checkpoint's value for an option passed as None (the other
            # families' generate unsets it)
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in {*SET_TO_NONE, "pad_token_id"}}
            return super().generate(input_ids, attention_mask, **kwargs)
        if generation_mode == "image":
            from ...generation.options import refuse_text_only
            from .image_generation import generate_image_tokens
            refuse_text_only(kwargs, "image generation (generation_mode='image')")
            self.require_generation_weights()
            if kwargs.get("generation_config") is not None:
                from ...generation.options import split_generate_kwargs
                # a transformers GenerationConfig becomes vlmkit's, over the model's, as text generation reads it
                kwargs["generation_config"] = split_generate_kwargs(self.generation_config,
                                                                    kwargs["generation_config"], {})[0]
            return generate_image_tokens(self, input_ids, attention_mask, **kwargs)
        raise InputError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}")

    # --- images out ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Pixels [B, H, W, 3] (channels last, processor-normalised range) from image tokens [B, N]."""
        self.require_generation_weights()
        return self.model.vqmodel.decode(image_tokens.to(self.device)).permute(0, 2, 3, 1)

    # --- image generation helpers (see image_generation.py) ------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.config.num_patches_per_side ** 2

    @property
    def begin_image_token_id(self) -> int:
        token_id = self.generation_config.extra.get("boi_token_id") or \
            (self.generation_config.extra.get("generation_kwargs") or {}).get("boi_token_id")
        if token_id is None:
            raise InputError("this checkpoint's generation config names no begin-of-image token (boi_token_id)")
        return int(token_id)

    def image_token_embeddings(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of image tokens: codebook embedding then the generation aligner."""
        return self.model.generation_aligner(self.model.generation_embeddings(image_tokens))
