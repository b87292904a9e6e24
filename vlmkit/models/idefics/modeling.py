"""IDEFICS: a LLaMA decoder that reads images through gated cross-attention layers (Flamingo style)
instead of image tokens in its sequence. A CLIP tower (and optionally a perceiver resampler) turns each
image into features; every ``cross_layer_interval``-th decoder layer is preceded by a gated
cross-attention layer over them; the processor's ``image_attention_mask`` says which images each text
position may see. The additional vocabulary (the image tokens) has its own embedding rows and LM-head
rows ("decoupled"), so it can be trained while the rest is frozen.

Module names are transformers', so its checkpoints load by name and ``state_dict`` is its own. ``IdeficsModel``
is transformers' class of that name: the same without the LM head, returning ``last_hidden_state``."""


import torch
from torch import nn
from torch.nn import functional as F

from ...errors import CheckpointError, InputError
from ...generation.loop import prompt_positions
from ...io.checkpoint import WeightLayout
from ...nn.decoder import DecoderModel
from ...generation.outputs import FieldsOutput
from ..base import ModelOutput, PretrainedVLM, causal_lm_loss, kept_positions
from .config import IdeficsConfig
from .cross_attention import GatedCrossAttentionLayer, IdeficsCache, ImageContext
from .perceiver import PerceiverResampler
from .vision import IdeficsVisionTransformer


class DecoupledEmbedding(nn.Embedding):
    """Token embeddings whose ids >= ``num_embeddings`` come from ``additional_embedding``."""

    def __init__(self, num_embeddings: int, num_additional: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.additional_embedding = nn.Embedding(num_additional, embedding_dim) if num_additional else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.additional_embedding is None:
            return F.embedding(input_ids, self.weight)
        is_additional = input_ids >= self.num_embeddings
        regular = F.embedding(input_ids.masked_fill(is_additional, 0), self.weight)
        additional = self.additional_embedding((input_ids - self.num_embeddings).clamp(min=0))
        return torch.where(is_additional[..., None], additional, regular)


class DecoupledLinear(nn.Linear):
    """The LM head: logits over the regular vocabulary, then over the additional one (``additional_fc``)."""

    def __init__(self, in_features: int, out_features: int, out_additional: int):
        super().__init__(in_features, out_features, bias=False)
        self.additional_fc = nn.Linear(in_features, out_additional, bias=False) if out_additional else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        return logits if self.additional_fc is None else torch.cat([logits, self.additional_fc(x)], dim=-1)


_IMAGE_INPUTS = ("pixel_values", "image_encoder_embeddings", "perceiver_embeddings")
_FREEZE_TYPES = {"LayerNorm": nn.LayerNorm, "Linear": nn.Linear, "Embedding": nn.Embedding}


def freeze_module(module: nn.Module, module_exceptions=()) -> None:
    """Freeze ``module``, leaving trainable the parameters owned by modules of the excepted types.

    As the reference: modules are visited parent first and each sets its whole subtree, so a parameter
    ends up trainable exactly when the module that owns it is of an excepted type."""
    try:
        kept = tuple(_FREEZE_TYPES[name] for name in module_exceptions)
    except KeyError as err:
        raise InputError(f"unknown module exception {err.args[0]!r}; known: {sorted(_FREEZE_TYPES)}") from None
    for child in module.modules():
        child.requires_grad_(bool(kept) and isinstance(child, kept))


class IdeficsDecoder(DecoderModel):
    """The LLaMA decoder with the vision side and the gated cross-attention layers interleaved."""

    def __init__(self, config: IdeficsConfig):
        super().__init__(config.text_config)
        text = config.text_config
        # replaces the plain embedding DecoderModel made (free on the meta device from_pretrained uses)
        self.embed_tokens = DecoupledEmbedding(text.vocab_size, config.additional_vocab_size, text.hidden_size)
        self.vision_model = IdeficsVisionTransformer(config.vision_config)
        self.perceiver_resampler = PerceiverResampler(config) if config.use_resampler else None
        self.cross_layer_interval = config.cross_layer_interval
        self.gated_cross_attn_layers = nn.ModuleList(GatedCrossAttentionLayer(config)
                                                     for _ in range(config.num_cross_layers))

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> IdeficsCache:
        """A KV cache that also carries the request's image keys/values."""
        weight = self.embed_tokens.weight
        return IdeficsCache(len(self.layers), batch_size, self.config.kv_heads, self.config.attention_head_dim,
                            max_len, dtype or weight.dtype, device or weight.device)

    def freeze_text_layers(self, module_exceptions=()) -> None:
        """Freeze the decoder layers and final norm (not the cross-attention layers, nor the embeddings)."""
        for module in (self.layers, self.norm):
            freeze_module(module, module_exceptions)

    def freeze_vision_layers(self, module_exceptions=()) -> None:
        """Freeze the vision tower (not the resampler)."""
        freeze_module(self.vision_model, module_exceptions)

    def image_context(self, image_states: torch.Tensor, image_attention_mask: torch.Tensor) -> ImageContext:
        """Every gated layer's keys/values of ``image_states`` [batch, images, L, width], and the masks."""
        batch, num_images, image_seq_len, width = image_states.shape
        flat = image_states.reshape(batch, num_images * image_seq_len, width)
        keys_values = [layer.cross_attn.image_keys_values(flat) for layer in self.gated_cross_attn_layers]
        return ImageContext.build(keys_values, image_attention_mask, image_seq_len)

    def forward(self, inputs_embeds, position_ids=None, attention_mask=None, cache: IdeficsCache | None = None,
                images: ImageContext | None = None, last_position_only: bool = False,
                all_hidden_states: list | None = None):
        """Hidden states (of the last position alone with ``last_position_only``, as DecoderModel); the images
        are ``images``, else those the prompt left in ``cache`` (see ``IdeficsForVisionText2Text.embed_prompt``),
        so a decode step is the plain decoder's call. ``all_hidden_states`` receives what transformers' recorder
        reads: the first decoder layer's input (after its gated cross-attention), each decoder layer's output
        (before the next gated cross-attention), the last one normed."""
        if images is None and cache is not None:
            images = cache.images

        def cross_attend(index: int, hidden_states: torch.Tensor) -> torch.Tensor:
            if index % self.cross_layer_interval:
                return hidden_states
            cross_index = index // self.cross_layer_interval
            return self.gated_cross_attn_layers[cross_index](hidden_states, images, cross_index)

        hidden_states = super().forward(inputs_embeds, position_ids, attention_mask, cache, last_position_only,
                                        all_hidden_states, before_layer=cross_attend)
        if cache is not None and images is not None and inputs_embeds.shape[1] > 1:
            cache.images = images.last_position()  # new tokens see what the prompt's last position saw
        return hidden_states


class IdeficsForVisionText2Text(PretrainedVLM):
    """IDEFICS for text generation from interleaved images and text."""

    accepted_inputs = ("pixel_values", "image_attention_mask", "image_encoder_embeddings", "perceiver_embeddings",
                       "interpolate_pos_encoding")
    ignored_inputs = PretrainedVLM.ignored_inputs + ("image_hidden_states",)

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        self.config = config
        self.model = IdeficsDecoder(config)
        text = config.text_config
        self.lm_head = DecoupledLinear(text.hidden_size, text.vocab_size, config.additional_vocab_size)
        self.freeze_relevant_params()
        self.post_init()

    @classmethod
    def config_from_folder(cls, folder, raw_config: dict):
        """(config, weight layout) for a transformers-layout IDEFICS folder."""
        if raw_config.get("model_type") != "idefics":
            raise CheckpointError(f"{folder} holds a {raw_config.get('model_type')!r} checkpoint, not IDEFICS")
        layout = WeightLayout(optional=(r"^lm_head\.weight$", r"^lm_head\.additional_fc\.weight$",
                                        r"\.vision_model\.post_layernorm\."))  # never applied (see vision.py)
        return IdeficsConfig.from_dict(raw_config), layout

    def tie_missing_weights(self, missing: set[str]) -> None:
        """A checkpoint saved with tied embeddings has no LM head: share the (decoupled) input embedding.
        A checkpoint without the vision tower's unused pooled-output norm gets a fresh one."""
        super().tie_missing_weights(missing)
        if "lm_head.additional_fc.weight" in missing:
            self.lm_head.additional_fc.weight = self.model.embed_tokens.additional_embedding.weight
        vision = self.model.vision_model
        if vision.post_layernorm.weight.is_meta:
            like = vision.pre_layrnorm.weight  # device and dtype
            for name, fill in (("weight", torch.ones), ("bias", torch.zeros)):
                old = getattr(vision.post_layernorm, name)
                setattr(vision.post_layernorm, name, nn.Parameter(fill(old.shape, device=like.device, dtype=like.dtype),
                                                                  old.requires_grad))

    @property
    def token_id_count(self) -> int:
        """The regular vocabulary and, after it, the additional one (the image tokens)."""
        return self.config.text_config.vocab_size + self.config.additional_vocab_size

    def refuse_resize(self) -> None:
        """``resize_token_embeddings`` on a checkpoint with an additional vocabulary: its image tokens sit right
        after the regular vocabulary, whose growth would move their ids (transformers' resize drops their
        LM-head rows)."""
        if self.config.additional_vocab_size:
            raise InputError(f"resize_token_embeddings: this IDEFICS checkpoint keeps {self.config.additional_vocab_size} "
                             "additional tokens (its image tokens) right after the regular vocabulary, whose ids "
                             "a resize would move; add new tokens by training the additional vocabulary instead")

    # --- freezing, as the reference sets it at construction ------------------------------------
    def freeze_relevant_params(self, config: IdeficsConfig | None = None) -> None:
        """Set ``requires_grad`` from the config's ``freeze_*`` flags: frozen text layers and regular
        embedding rows, frozen vision tower, frozen regular LM-head rows; the additional vocabulary's
        embedding and head rows, the cross-attention layers and the resampler stay trainable."""
        config = config or self.config
        if config.freeze_text_layers:
            self.model.embed_tokens.weight.requires_grad_(False)
            self.model.freeze_text_layers(config.freeze_text_module_exceptions)
        if config.freeze_vision_layers:
            self.model.freeze_vision_layers(config.freeze_vision_module_exceptions)
        if config.freeze_lm_head:
            self.lm_head.weight.requires_grad_(False)

    # --- what base.py and generation/ (decode.py, loop.py) use ---------------------------------
    @property
    def text_model(self) -> IdeficsDecoder:
        return self.model

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def new_cache(self, batch_size: int, max_len: int) -> IdeficsCache:
        return self.model.new_cache(batch_size, max_len)

    def embed_prompt(self, input_ids, cache: IdeficsCache, image_attention_mask=None, **image_inputs):
        """The prompt's token embeddings for generation/decode.py's ``prefill``; the images, encoded once,
        go into ``cache`` for the cross-attention layers (which keep the last position's view to decode)."""
        images = None
        has_images = any(image_inputs.get(k) is not None for k in _IMAGE_INPUTS)
        # a batch none of whose positions may see an image needs no vision work: its attention branch is zero
        if has_images and (image_attention_mask is None or bool(image_attention_mask.any())):
            images = self.image_context(input_ids.shape, image_attention_mask, **image_inputs)[0]
        cache.images = images
        return self.model.embed_tokens(input_ids)

    # --- images ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values=None, image_encoder_embeddings=None, perceiver_embeddings=None,
                      interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Image features [batch, images, L, width] that cross-attention reads, from exactly one of
        pixels [batch, images, 3, H, W], vision-tower outputs or resampler outputs (each [batch, images, L, width])."""
        given = [x is not None for x in (pixel_values, image_encoder_embeddings, perceiver_embeddings)]
        if sum(given) != 1:
            raise InputError("pass exactly one of pixel_values, image_encoder_embeddings or perceiver_embeddings")
        if perceiver_embeddings is not None:
            if self.model.perceiver_resampler is None:
                raise InputError("perceiver_embeddings were given but this model has no resampler (use_resampler "
                                 "is false); pass pixel_values or image_encoder_embeddings")
            return _checked(perceiver_embeddings, 4, "perceiver_embeddings").to(self.device, self.dtype)
        if pixel_values is not None:
            _checked(pixel_values, 5, "pixel_values")
            batch, num_images = pixel_values.shape[:2]
            pixel_values = pixel_values.flatten(0, 1).to(self.device, self.dtype)
            features = self.model.vision_model(pixel_values, interpolate_pos_encoding)
        else:
            features = _checked(image_encoder_embeddings, 4, "image_encoder_embeddings").to(self.device, self.dtype)
            batch, num_images = features.shape[:2]
            features = features.flatten(0, 1)
        if self.model.perceiver_resampler is not None:
            features = self.model.perceiver_resampler(features)
        return features.view(batch, num_images, *features.shape[1:])

    def image_context(self, text_shape, image_attention_mask, **image_inputs) -> tuple[ImageContext, torch.Tensor]:
        """(context for the gated layers, image features) after checking the mask fits text and images."""
        if image_attention_mask is None:
            raise InputError("images need image_attention_mask [batch, text_length, num_images] (the processor "
                             "returns it) to say which images each text position may attend to")
        image_states = self.encode_images(**image_inputs)
        expected = (text_shape[0], text_shape[1], image_states.shape[1])
        if image_states.shape[0] != text_shape[0] or tuple(image_attention_mask.shape) != expected:
            raise InputError(f"image_attention_mask is shaped {tuple(image_attention_mask.shape)} for "
                             f"{image_states.shape[0]} row(s) of {image_states.shape[1]} image(s), but the text "
                             f"calls for {expected} (batch, text length, images)")
        return self.model.image_context(image_states, image_attention_mask.to(image_states.device)), image_states

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                pixel_values=None, image_encoder_embeddings=None, perceiver_embeddings=None, image_attention_mask=None,
                labels=None, use_cache=None, interpolate_pos_encoding: bool = False, return_dict=None,
                cache_position=None, logits_to_keep: int = 0, output_hidden_states=None, output_attentions=None,
                **unused) -> ModelOutput:
        """Logits over the whole vocabulary (regular + additional); ``labels`` give the causal-LM loss.

        Without any image input every position is text-only (the same result as the reference with a
        blank image that no position may see). The cache options, ``output_hidden_states`` and
        ``return_dict`` are transformers' (see ``PretrainedVLM.run_text_model``): a call that continues
        ``past_key_values`` passes the images again (``image_hidden_states`` of the first call as
        ``perceiver_embeddings``/``image_encoder_embeddings``, as transformers' generate does) with the new
        positions' ``image_attention_mask``, or none: the new positions then see what the cached prompt's
        last position saw."""
        hidden, cache, all_hidden, image_states = self.decoder_outputs(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, pixel_values,
            image_encoder_embeddings, perceiver_embeddings, image_attention_mask, use_cache, interpolate_pos_encoding,
            cache_position, output_hidden_states, output_attentions)
        hidden = kept_positions(hidden, logits_to_keep)
        logits = self.lm_logits(hidden)
        # over all columns, additional vocabulary included (the reference's loss reshapes the logits to
        # the regular vocabulary only and fails when additional_vocab_size > 0)
        loss = causal_lm_loss(logits, labels, num_items_in_batch=unused.get("num_items_in_batch")) \
            if labels is not None else None
        return self.forward_output(return_dict, loss=loss, logits=logits, past_key_values=cache,
                                   hidden_states=all_hidden, image_hidden_states=image_states,
                                   last_hidden_state=hidden)

    def decoder_outputs(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, pixel_values,
                        image_encoder_embeddings, perceiver_embeddings, image_attention_mask, use_cache,
                        interpolate_pos_encoding, cache_position, output_hidden_states, output_attentions):
        """What ``forward`` computes before the LM head: (the decoder's normed output [B, T, H], the KV cache or
        None, each layer's hidden states or None, the image features or None)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids)
        if position_ids is None and attention_mask is not None:
            # the reference counts positions from the mask (cached positions included)
            position_ids = prompt_positions(attention_mask)[:, -inputs_embeds.shape[1]:]
        images = image_states = None
        image_inputs = dict(zip(_IMAGE_INPUTS, (pixel_values, image_encoder_embeddings, perceiver_embeddings)))
        if any(v is not None for v in image_inputs.values()):
            images, image_states = self.image_context(inputs_embeds.shape, image_attention_mask,
                                                      interpolate_pos_encoding=interpolate_pos_encoding,
                                                      **image_inputs)
        hidden, cache, all_hidden = self.run_text_model(
            inputs_embeds, attention_mask, position_ids, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, images=images)
        return hidden, cache, all_hidden, image_states


class IdeficsBaseModelOutput(FieldsOutput):
    """``IdeficsModel``'s forward results, transformers' ``IdeficsBaseModelOutputWithPast`` (``out[0]`` is
    ``last_hidden_state``)."""

    FIELDS = ("last_hidden_state", "past_key_values", "hidden_states", "attentions", "image_hidden_states")


class IdeficsModel(IdeficsForVisionText2Text):
    """transformers' ``IdeficsModel``: IDEFICS without the LM head, whose ``forward`` returns the decoder's normed
    output (``last_hidden_state``). Its weights are named as transformers' are, without the ``model.`` prefix
    (``state_dict``, ``save_pretrained``); a checkpoint of either class loads (an LM head is skipped)."""

    def __init__(self, config: IdeficsConfig):
        super().__init__(config)
        del self.lm_head
        self.lm_head = None
        self.register_state_dict_post_hook(_without_model_prefix)
        self.register_load_state_dict_pre_hook(_with_model_prefix)

    @classmethod
    def can_generate(cls) -> bool:
        return False

    @classmethod
    def config_from_folder(cls, folder, raw_config: dict):
        config, _ = super().config_from_folder(folder, raw_config)
        return config, WeightLayout(lambda name, tensor: [(name.removeprefix("model."), tensor)], ignore=(r"^lm_head\.",),
                                    optional=(r"(^|\.)vision_model\.post_layernorm\.",))

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: there is no LM head."""

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise InputError("IdeficsModel has no LM head (it returns hidden states); load IdeficsForVisionText2Text "
                         "to get logits or generate text")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                pixel_values=None, image_encoder_embeddings=None, perceiver_embeddings=None, image_attention_mask=None,
                use_cache=None, interpolate_pos_encoding: bool = False, return_dict=None, cache_position=None,
                output_hidden_states=None, output_attentions=None, **unused) -> IdeficsBaseModelOutput:
        """``last_hidden_state`` [B, T, H] (and ``past_key_values``, ``hidden_states``, ``image_hidden_states``)
        for the inputs ``IdeficsForVisionText2Text.forward`` takes."""
        hidden, cache, all_hidden, image_states = self.decoder_outputs(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, pixel_values,
            image_encoder_embeddings, perceiver_embeddings, image_attention_mask, use_cache, interpolate_pos_encoding,
            cache_position, output_hidden_states, output_attentions)
        output = IdeficsBaseModelOutput(last_hidden_state=hidden, past_key_values=cache, hidden_states=all_hidden,
                                        image_hidden_states=image_states)
        return output.to_tuple() if return_dict is False else output


def _without_model_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        state_dict[prefix + key[len(prefix) + len("model."):]] = state_dict.pop(key)


def _with_model_prefix(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "model.")]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


def _checked(tensor: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if tensor.ndim != ndim:
        shape = "[batch, images, 3, height, width]" if ndim == 5 else "[batch, images, length, width]"
        raise InputError(f"{name} must be shaped {shape}, got {tuple(tensor.shape)}")
    return tensor
