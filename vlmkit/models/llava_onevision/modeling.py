"""LLaVA-OneVision: a SigLIP tower whose patch features pass a two-layer projector into a Qwen2
decoder. Single images are tiled anyres (base image + tiles, unpadded, capped by anyres_max_N, a
newline embedding after every feature row); images of a multi-image prompt and video frames are
not tiled, and video frames are pooled 2x.

Module names follow transformers 5's in-memory layout; the names checkpoints are saved under (the
llava-hf repos' transformers 4 names, transformers 5's saved names) are mapped in ``_RENAMES``."""

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import CheckpointError, InputError
from ...generation.loop import check_context
from ...io.checkpoint import WeightLayout
from ...nn.activations import get_activation
from ...nn.decoder import DecoderModel
from ...nn.feature_cache import FeatureCache
from ..base import ModelOutput, PretrainedVLM, causal_lm_loss, kept_positions
from . import anyres
from .config import LlavaOnevisionConfig
from .vision import SiglipVisionTransformer


class MultiModalProjector(nn.Module):
    """linear_2(act(linear_1(x))): vision features (of every selected layer) into the LM's width."""

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        in_features = config.vision_config.hidden_size * len(config.feature_layers)
        width, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_features, width, bias=bias)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(width, width, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaOnevisionModel(nn.Module):
    """The tower, the projector, the newline embedding and the decoder (no LM head)."""

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        self.vision_tower = SiglipVisionTransformer(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        # random as transformers draws it, for a model built from a config (a checkpoint overwrites it)
        width = config.text_config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(width) / width ** 0.5)
        self.language_model = DecoderModel(config.text_config)


# Checkpoint names -> module names. The llava-hf repos were written by transformers 4 (the decoder under
# language_model.model, the LM head under language_model, the SigLIP layers under vision_tower.vision_model);
# transformers 5 saves the same top-level names without vision_model and loads them under model.*.
_RENAMES = [(re.compile(pattern), target) for pattern, target in (
    (r"^(model\.)?vision_tower\.vision_model\.", r"\1vision_tower."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.(model\.)?", "model.language_model."),
    (r"^(vision_tower|multi_modal_projector|image_newline)", r"model.\1"),
)]


def _rename_llava_hf(name: str, tensor: torch.Tensor):
    for pattern, target in _RENAMES:
        name = pattern.sub(target, name)
    return [(name, tensor)]


class LlavaOnevisionForConditionalGeneration(PretrainedVLM):
    """LLaVA-OneVision for images (single, multi-image, batched) and videos, text out."""

    accepted_inputs = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos",
                       "image_sizes_videos")

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        self.config = config
        self.model = LlavaOnevisionModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        # projected features of recent tiles and frames, by pixel content: a repeated image skips the tower
        self.vision_cache = FeatureCache()
        self.post_init()

    @classmethod
    def config_from_folder(cls, folder, raw_config: dict):
        """(config, weight layout) for a llava-hf folder (transformers 4 or 5 weight names)."""
        if raw_config.get("model_type") != "llava_onevision":
            raise CheckpointError(f"{folder} holds a {raw_config.get('model_type')!r} checkpoint, not LLaVA-OneVision")
        layout = WeightLayout(_rename_llava_hf, ignore=(r"vision_tower\.(vision_model\.)?head\.",),
                              optional=(r"^lm_head\.weight$",))
        return LlavaOnevisionConfig.from_dict(raw_config), layout

    @property
    def text_model(self) -> DecoderModel:
        return self.model.language_model

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id, self.config.video_token_id)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # --- vision --------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.config.vision_config.grid_size

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features [N, grid * grid, hidden] of tower inputs [N, 3, size, size]."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(f"vision inputs must be shaped [N, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        model = self.model
        return self.vision_cache.features(pixel_values.to(self.dtype), self._encode_uncached,
                                          (model.vision_tower, model.multi_modal_projector))

    def _encode_uncached(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.vision_tower.hidden_states(pixel_values, self.config.feature_layers)
        if self.drops_first_feature:
            features = features[:, 1:]
        return self.model.multi_modal_projector(features)

    @property
    def drops_first_feature(self) -> bool:
        """vision_feature_select_strategy "default": the reference drops each tower input's first feature (a
        class token in CLIP towers; a patch in SigLIP's), leaving grid * grid - 1 features that no longer form
        a grid: only images of multi-image prompts, which are not tiled, can use them."""
        return self.config.vision_feature_select_strategy == "default"

    def _refuse_grids_without_first_feature(self, what: str) -> None:
        if self.drops_first_feature:
            raise InputError(f"this checkpoint's vision_feature_select_strategy 'default' drops a feature of every "
                             f"tile, so {what} no longer make a feature grid (transformers fails on them too); it "
                             f"reads images only in prompts of two or more images (or set the strategy to 'full' "
                             f"in config.json and processor_config.json, as OneVision checkpoints have it)")

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes,
                           batch_num_images=None) -> list[torch.Tensor]:
        """Per image, its packed features [tokens, hidden], as many as the processor's
        ``image_token_count`` for it.

        ``pixel_values`` [num_images, patches, 3, S, S] (zero-padded patches ignored) or the patches of
        all images concatenated [total, 3, S, S]; ``image_sizes`` (height, width) per image;
        ``batch_num_images`` images per prompt (a prompt with several gets no tiling; None: all tiled)."""
        if image_sizes is None:
            raise InputError("pixel_values need image_sizes (the processor returns both)")
        self._refuse_other_input_size(pixel_values)
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        sizes = [(int(height), int(width)) for height, width in sizes]
        tiled = _tiled_flags(batch_num_images, len(sizes))
        if any(tiled):
            self._refuse_grids_without_first_feature("a single image's anyres tiles")
        config, tile = self.config, self.config.vision_config.image_size
        counts = [anyres.num_anyres_patches(s, config.image_grid_pinpoints, tile) if t else 1
                  for s, t in zip(sizes, tiled)]
        pixel_values = _used_patches(pixel_values, counts)
        features = torch.split(self._encode(pixel_values), counts)
        return [self._pack_anyres(f, s) if t else self._pack_single(f[0]) for f, s, t in zip(features, sizes, tiled)]

    def _refuse_other_input_size(self, pixel_values: torch.Tensor) -> None:
        """Tower inputs must be the checkpoint's image_size square; a processor call's ``size=`` can make
        others (the reference's processor takes any size, its model then fails on them too)."""
        side = self.config.vision_config.image_size
        if pixel_values.ndim in (4, 5) and tuple(pixel_values.shape[-2:]) != (side, side):
            height, width = pixel_values.shape[-2:]
            raise InputError(f"pixel_values are {height}x{width} (height x width) but this checkpoint's vision tower "
                             f"takes {side}x{side}; preprocess without a size= option (or with size={side})")

    def _newline(self, like: torch.Tensor) -> torch.Tensor:
        return self.model.image_newline.to(like.device, like.dtype)

    def _pack_single(self, feature: torch.Tensor) -> torch.Tensor:
        return torch.cat((feature, self._newline(feature)[None]))

    def _pack_anyres(self, feature: torch.Tensor, image_size: anyres.Size) -> torch.Tensor:
        """Base features, then the tiles stitched into one map, unpadded, shrunk to anyres_max_N,
        each row ended by the newline embedding, read row by row."""
        config, grid = self.config, self.grid_size
        rows, cols = anyres.tile_grid(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
        base, tiles = feature[0], feature[1:]
        width = tiles.shape[-1]
        # [rows*cols, grid*grid, C] -> [C, rows*grid, cols*grid]
        stitched = tiles.view(rows, cols, grid, grid, width).permute(4, 0, 2, 1, 3).reshape(
            width, rows * grid, cols * grid)
        row_slice, col_slice = anyres.unpadded_region(image_size, stitched.shape[1:])
        stitched = stitched[:, row_slice, col_slice]
        smaller = anyres.downsampled_size(tuple(stitched.shape[1:]), grid, config.max_num_patches)
        if smaller is not None and min(smaller) == 0:  # transformers' interpolation fails on it too
            height, width_px = image_size
            raise InputError(f"an image of {width_px}x{height} pixels is too elongated for this checkpoint's "
                             f"{config.vision_aspect_ratio}: its features would shrink to {smaller[0]}x{smaller[1]}; "
                             f"crop or pad it nearer to square")
        if smaller is not None:
            stitched = F.interpolate(stitched[None], list(smaller), mode="bilinear")[0]
        newlines = self._newline(stitched)[:, None, None].expand(width, stitched.shape[1], 1)
        stitched = torch.cat((stitched, newlines), dim=-1)
        return torch.cat((base, stitched.flatten(1, 2).transpose(0, 1)))

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Per video [num_videos, frames * ceil(grid/2)^2 + 1, hidden]: each frame's feature grid
        pooled 2x (bilinear, rounding up), then one newline embedding after the last frame."""
        if pixel_values_videos.ndim != 5:
            raise InputError(f"pixel_values_videos must be shaped [videos, frames, 3, H, W], "
                             f"got {tuple(pixel_values_videos.shape)}")
        self._refuse_grids_without_first_feature("video frames")
        videos, frames = pixel_values_videos.shape[:2]
        features = self._encode(pixel_values_videos.flatten(0, 1))
        grid, pooled = self.grid_size, math.ceil(self.grid_size / 2)
        maps = features.view(videos * frames, grid, grid, -1).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=[pooled, pooled], mode="bilinear")
        features = maps.permute(0, 2, 3, 1).reshape(videos, frames * pooled * pooled, -1)
        newline = self._newline(features)[None, None].expand(videos, 1, -1)
        return torch.cat((features, newline), dim=1)

    # --- the language side ---------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, batch_num_images=None,
                     pixel_values_videos=None, image_sizes_videos=None) -> torch.Tensor:
        """Token embeddings with image and video features written over their placeholder tokens."""
        return self._embed_with_features(input_ids, pixel_values, image_sizes, batch_num_images, pixel_values_videos,
                                         image_sizes_videos)[0]

    def _embed_with_features(self, input_ids, pixel_values=None, image_sizes=None, batch_num_images=None,
                             pixel_values_videos=None, image_sizes_videos=None):
        """(``embed_inputs``' embeddings, the image features written [image tokens, hidden] or None)."""
        image_features = None
        embeds = self.text_model.embed_tokens(input_ids)
        for kind, token_id, pixels in (("image", self.config.image_token_id, pixel_values),
                                       ("video", self.config.video_token_id, pixel_values_videos)):
            positions = input_ids == token_id
            num_slots = int(positions.sum())
            if pixels is None:
                if num_slots:
                    raise InputError(f"the prompt holds {num_slots} {kind} tokens but no {kind} pixels were given; "
                                     f"build the inputs with the processor")
                continue
            if kind == "image":
                features = image_features = torch.cat(self.get_image_features(pixels, image_sizes, batch_num_images))
            else:
                features = self.get_video_features(pixels).flatten(0, 1)
            if features.shape[0] != num_slots:
                raise InputError(f"the prompt holds {num_slots} {kind} tokens but the {kind}(s) given make "
                                 f"{features.shape[0]} features; each <{kind}> must be expanded by the processor "
                                 f"that preprocessed the {kind}s, with one <{kind}> per {kind}")
            embeds = embeds.clone()
            embeds[positions] = features.to(embeds.dtype)
        return embeds, image_features

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, pixel_values_videos=None,
                image_sizes_videos=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                vision_aspect_ratio=None, batch_num_images=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep: int = 0,
                **unused) -> ModelOutput:
        """Logits over the vocabulary for every position (or the last ``logits_to_keep``); ``labels``
        give the mean next-token loss (-100 ignored). The cache options, ``output_hidden_states`` and
        ``return_dict`` are transformers' (see ``PretrainedVLM.run_text_model``); ``image_hidden_states`` are
        the packed image features [image tokens, hidden]."""
        self._refuse_other_vision_settings(vision_feature_layer=vision_feature_layer,
                                           vision_feature_select_strategy=vision_feature_select_strategy,
                                           vision_aspect_ratio=vision_aspect_ratio)
        image_features = None
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("forward needs input_ids or inputs_embeds")
            cached = past_key_values.get_seq_length() if hasattr(past_key_values, "reserve") else 0
            check_context(cached + input_ids.shape[1], 0, self.max_context)
            inputs_embeds, image_features = self._embed_with_features(
                input_ids, pixel_values, image_sizes, batch_num_images, pixel_values_videos, image_sizes_videos)
        hidden, cache, all_hidden = self.run_text_model(
            inputs_embeds, attention_mask, position_ids, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions)
        hidden = kept_positions(hidden, logits_to_keep)
        logits = self.lm_logits(hidden)
        loss = causal_lm_loss(logits, labels, num_items_in_batch=unused.get("num_items_in_batch")) \
            if labels is not None else None
        return self.forward_output(return_dict, loss=loss, logits=logits, past_key_values=cache,
                                   hidden_states=all_hidden, image_hidden_states=image_features,
                                   last_hidden_state=hidden)

    def _refuse_other_vision_settings(self, **settings) -> None:
        """transformers' forward takes the checkpoint's vision settings per call; vlmkit reads them from the
        config only, so a different value is an error rather than silently ignored."""
        config = self.config
        current = dict(vision_feature_layer=config.vision_feature_layer,
                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                       vision_aspect_ratio=config.vision_aspect_ratio)
        for name, value in settings.items():
            if value is not None and value != current[name]:
                raise InputError(f"{name}={value!r} differs from this checkpoint's {current[name]!r}, and vlmkit "
                                 f"does not change it per call: set it in config.json before loading")


def _used_patches(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The patches the images use, concatenated [sum(counts), 3, S, S], from the processor's
    zero-padded [num_images, max_patches, 3, S, S] (or already concatenated patches)."""
    if pixel_values.ndim == 5:
        if pixel_values.shape[0] != len(counts) or pixel_values.shape[1] < max(counts):
            raise InputError(f"pixel_values {tuple(pixel_values.shape)} do not fit {len(counts)} image(s) needing "
                             f"{counts} patches; pass the processor's pixel_values, image_sizes and batch_num_images")
        for index, (patches, n) in enumerate(zip(pixel_values, counts)):
            # the processor pads with all-zero patches; anything else past an image's count was cut with other
            # grid pinpoints (a call's image_grid_pinpoints=), which transformers' model silently drops,
            # reading the first tiles as if they covered the whole image
            if patches[n:].any():
                raise InputError(f"image {index}'s pixel_values hold more than the {n} patches this checkpoint's "
                                 f"image_grid_pinpoints make for it: they were cut with other pinpoints (a call's "
                                 f"image_grid_pinpoints= option?), which the model cannot read; preprocess with "
                                 f"the checkpoint's pinpoints")
        return torch.cat([patches[:n] for patches, n in zip(pixel_values, counts)])
    if pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
        raise InputError(f"pixel_values {tuple(pixel_values.shape)} do not hold the {sum(counts)} patches "
                         f"of {len(counts)} image(s)")
    return pixel_values


def _tiled_flags(batch_num_images, num_images: int) -> list[bool]:
    """Whether each image is anyres-tiled: only images alone in their prompt are."""
    if batch_num_images is None:
        return [True] * num_images
    per_prompt = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
    if sum(per_prompt) != num_images:
        raise InputError(f"batch_num_images {per_prompt} does not add up to the {num_images} image(s) given")
    return [n == 1 for n in per_prompt for _ in range(n)]
