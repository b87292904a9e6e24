"""LlavaOnevisionProcessor: prompts with ``<image>``/``<video>`` expanded to as many tokens as the model
makes features, images to anyres pixel values, videos to frames, chat templates, decoding. Mirrors
transformers' LlavaOnevisionProcessor (images through its PIL backend, videos through its video processor)."""


import os

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ...io.checkpoint import checkpoint_location
from ...io.chat_template import processor_chat_template
from ...io.features import as_return_type
from ...io.media import is_tensor
from ...io.tokenizer import Tokenizer
from ...io.video import load_video
from ...processing import (BatchFeature, ProcessorBase, check_media_tokens_kept, config_file, expand_placeholders,
                           flatten_images, media_from_messages, prompt_texts, sort_load_options)
from ...processor_options import sort_call_options
from . import anyres
from .config import parse_max_num_patches
from .image_processing import LlavaOnevisionImageProcessor

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
# from_pretrained keywords for the image and video processors beside every family's, for the video processor
# alone, and for the processor itself (transformers' LlavaOnevisionProcessor.__init__ arguments)
_IMAGE_KEYS, _VIDEO_KEYS = ("image_grid_pinpoints", "do_sample_frames"), ("do_sample_frames",)
_PROCESSOR_KEYS = ("num_image_tokens", "vision_feature_select_strategy", "chat_template", "image_token", "video_token",
                   "vision_aspect_ratio")


class LlavaOnevisionProcessor(ProcessorBase):
    """Tokenizer + image/video preprocessing + the OneVision placeholder rules."""

    own_settings = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "video_token",
                      "vision_aspect_ratio")

    def __init__(self, image_processor: LlavaOnevisionImageProcessor, tokenizer: Tokenizer,
                 video_processor: LlavaOnevisionImageProcessor | None = None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = "full", chat_template: str | None = None,
                 image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN,
                 vision_aspect_ratio: str = "anyres_max_9", do_sample_frames: bool = False):
        self.image_processor = image_processor
        self.video_processor = video_processor or image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.special_tokens.get("image_token", image_token)
        self.video_token = tokenizer.special_tokens.get("video_token", video_token)
        self.image_token_id = tokenizer.token_id(self.image_token)
        self.video_token_id = tokenizer.token_id(self.video_token)
        self.media_tokens = (self.image_token, self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        # whether a call's num_frames/fps sample the video (the checkpoint's video processor setting; off in
        # transformers' LLaVA-OneVision video processor, so a plain call keeps every frame)
        self.do_sample_frames = do_sample_frames
        self.max_num_patches = parse_max_num_patches(vision_aspect_ratio)
        # the tower's patches per side; the reference derives it from num_image_tokens the same way
        self.num_image_tokens = num_image_tokens or 729
        self.grid_size = int(self.num_image_tokens ** 0.5)

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str = "main", **options) -> "LlavaOnevisionProcessor":
        """Load from a checkpoint folder or the HF cache. Reads transformers 5's single
        ``processor_config.json`` and the older separate preprocessor/video-preprocessor files alike. Other
        keywords override the checkpoint's settings, as in transformers: the image and video processors'
        (``image_mean``, ``size``...), the processor's (``num_image_tokens``...) and the tokenizer's."""
        folder = checkpoint_location(name_or_path, options, revision)
        loading = sort_load_options(options, _IMAGE_KEYS, _PROCESSOR_KEYS)
        processor_config = config_file(folder, "processor_config.json")
        image_config = processor_config.get("image_processor") or config_file(folder, "preprocessor_config.json")
        video_config = {**(processor_config.get("video_processor")
                           or config_file(folder, "video_preprocessor_config.json") or image_config), **loading.image}
        image_config = {**image_config, **{k: v for k, v in loading.image.items() if k not in _VIDEO_KEYS}}
        tokenizer = Tokenizer.from_pretrained(folder, **loading.tokenizer)
        settings = {"num_image_tokens": processor_config.get("num_image_tokens"),
                    "vision_feature_select_strategy": processor_config.get("vision_feature_select_strategy"),
                    "chat_template": processor_chat_template(folder, processor_config, tokenizer.config),
                    "image_token": processor_config.get("image_token", IMAGE_TOKEN),
                    "video_token": processor_config.get("video_token", VIDEO_TOKEN),
                    "vision_aspect_ratio": processor_config.get("vision_aspect_ratio", "anyres_max_9"),
                    **loading.processor}
        return cls(LlavaOnevisionImageProcessor.from_config(image_config), tokenizer,
                   video_processor=LlavaOnevisionImageProcessor.from_config(video_config),
                   do_sample_frames=bool(video_config.get("do_sample_frames", False)), **settings)

    # --- placeholder counts ---------------------------------------------------------------------
    def image_token_count(self, image_size: anyres.Size, anyres_tiling: bool = True, image_processor=None) -> int:
        """Prompt tokens for one image of ``image_size`` (height, width); see ``anyres.image_token_count``.
        ``image_processor``: the one that made the pixels, when a call changed its settings.

        As the reference, the count takes the tower inputs' size from the call but the grid pinpoints from
        the checkpoint, whatever ``image_grid_pinpoints`` the call cut the pixels with: the model tiles
        with the checkpoint's pinpoints too (and refuses pixels cut with others)."""
        image_processor = image_processor or self.image_processor
        count = anyres.image_token_count(image_size, self.image_processor.image_grid_pinpoints,
                                         image_processor.output_size, self.grid_size, self.max_num_patches,
                                         anyres=anyres_tiling)
        # a "default" strategy drops a class token SigLIP does not have; kept for parity with the reference
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def video_token_count(self, num_frames: int) -> int:
        """Prompt tokens for one video of ``num_frames`` frames."""
        return anyres.video_token_count(num_frames, self.grid_size)

    # --- the call ---------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Tokenise prompt(s), expanding each ``<image>``/``<video>`` to its feature count, and
        preprocess the images (one per ``<image>``, in order) and videos (one per ``<video>``).
        Without ``text``, only the pixel features (as the reference returns them).

        ``images``: one image, a flat list (every image anyres-tiled), or one list per prompt (a prompt
        with several images gets them untiled, as the reference). ``videos``: one video or a list;
        each is a path/URL/bytes/array/frame list, all its frames kept unless ``do_sample_frames``
        (the checkpoint's setting by default) samples ``num_frames`` of them (or ``fps``). Takes
        transformers' tokenizer, image and video options (``padding``, ``max_length``, ``do_rescale``,
        ``size``..., flat or as ``text_kwargs``/``images_kwargs``/``videos_kwargs``) and
        ``return_tensors`` "pt" (the default), "np" or None."""
        options = sort_call_options(kwargs, family_images=("image_grid_pinpoints",), videos=True)
        if text is None and not (flatten_images(images)[0] or _as_video_list(videos)):
            raise InputError("LlavaOnevisionProcessor needs text (a prompt, or a list of prompts), images or videos")
        texts = None if text is None else prompt_texts(text)
        texts, features = self._expand_images(texts, images, options.images)
        texts, video_features = self._expand_videos(texts, videos, options.videos)
        features.update(video_features)
        if texts is None:  # pixels alone, as the reference returns them for a call without text
            return _as_return_type(BatchFeature(**features), options.return_tensors)
        encoded = self.tokenizer(texts, **options.text)
        check_media_tokens_kept(texts, encoded["input_ids"], {self.image_token: self.image_token_id,
                                                               self.video_token: self.video_token_id})
        return _as_return_type(BatchFeature(**encoded, **features), options.return_tensors)

    def _expand_images(self, texts: list[str] | None, images, image_options: dict) -> tuple[list[str] | None, dict]:
        """Texts with each ``<image>`` expanded (None stays None), and pixel_values / image_sizes /
        batch_num_images."""
        flat_images, counts = flatten_images(images)
        if not flat_images:
            return _expanded(texts, self.image_token, None, str, 0), {}  # raises if any <image>
        groups = _image_groups(images)
        image_processor = self.image_processor.with_options(image_options)
        pixels = image_processor(groups)
        if texts is None:
            return None, pixels
        tiled = [len(group) == 1 for group in groups if group for _ in group]
        sizes = [tuple(size) for size in pixels["image_sizes"].tolist()]
        tokens = [self.image_token * self.image_token_count(size, t, image_processor) for size, t in zip(sizes, tiled)]
        return expand_placeholders(texts, self.image_token, counts, tokens.__getitem__, len(flat_images)), pixels

    def _expand_videos(self, texts: list[str] | None, videos, video_options: dict) -> tuple[list[str] | None, dict]:
        """Texts with each ``<video>`` expanded (None stays None), and pixel_values_videos
        [videos, frames, 3, S, S]."""
        sources = _as_video_list(videos)
        if not sources:
            return _expanded(texts, self.video_token, None, str, 0, kind="video"), {}
        video_options = dict(video_options)
        num_frames, fps = video_options.pop("num_frames", None), video_options.pop("fps", None)
        if not video_options.pop("do_sample_frames", self.do_sample_frames):
            num_frames = fps = None  # transformers keeps every frame unless asked to sample
        processor = self.video_processor.with_options(video_options)
        # frames already in memory are taken whatever their count, as transformers takes them (the server has
        # applied its --max-video-frames); a file or URL is held to load_video's frame limit while it decodes
        frames = [processor.preprocess_frames(load_video(v, num_frames, fps=fps, **_frame_limit(v))) for v in sources]
        if len({tuple(f.shape) for f in frames}) > 1:
            raise InputError("videos of different frame counts cannot be batched; pass the same num_frames")
        tokens = [self.video_token * self.video_token_count(len(f)) for f in frames]
        texts = _expanded(texts, self.video_token, None, tokens.__getitem__, len(frames), kind="video")
        return texts, {"pixel_values_videos": torch.stack(frames)}

    def encode_chat(self, prompts: list[str], conversations: list[list[dict]], call_options: dict) -> BatchFeature:
        """The rendered prompts with the images and videos their messages name (``url``/``path``/
        ``image``/``video``). Each conversation's images form one group: two images in one conversation
        are a multi-image prompt (no anyres tiling), as in the reference."""
        images = [media_from_messages(messages, "image") for messages in conversations]
        videos = [v for messages in conversations for v in media_from_messages(messages, "video")]
        return self(images=images if any(images) else None, text=prompts, videos=videos or None, **call_options)


def _as_return_type(features: BatchFeature, return_tensors: str | None) -> BatchFeature:
    """``as_return_type``, except that with return_tensors=None the videos stay one torch tensor each: the
    reference's video processor is torch-based and returns them so, while its image processor gives numpy."""
    out = as_return_type(features, return_tensors)
    if return_tensors is None and "pixel_values_videos" in features:
        out["pixel_values_videos"] = list(features["pixel_values_videos"])
    return out


def _expanded(texts: list[str] | None, *placeholder_args, **placeholder_kwargs) -> list[str] | None:
    """``expand_placeholders`` for prompts, nothing for a call without text (no placeholders to match)."""
    return None if texts is None else expand_placeholders(texts, *placeholder_args, **placeholder_kwargs)


def _image_groups(images) -> list[list]:
    """Images as one list per prompt: a list of lists stays, a flat list or single image is one
    image per group (each tiled), as the reference's image processor reads them."""
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, (list, tuple)) for i in images):
        return [list(g) for g in images]
    if isinstance(images, (list, tuple)):
        return [[i] for i in images]
    return [[images]]


def _as_video_list(videos) -> list:
    if videos is None:
        return []
    if (isinstance(videos, np.ndarray) or is_tensor(videos)) and videos.ndim == 5:
        # a batch [B, T, ...] is B videos, as the reference's make_batched_videos splits it
        return list(videos)
    if isinstance(videos, (list, tuple)):
        # a list of frames (images) is one video; otherwise a list of videos
        if videos and all(_is_frame(v) for v in videos):
            return [list(videos)]
        return list(videos)
    return [videos]


def _is_frame(item) -> bool:
    # the reference's is_valid_video_frame: a PIL image, or a 3-D array or tensor ((H, W, C) or (C, H, W))
    return isinstance(item, Image.Image) or ((isinstance(item, np.ndarray) or is_tensor(item)) and item.ndim == 3)


def _frame_limit(video) -> dict:
    """``load_video``'s ``max_frames`` for ``video``: its own count when its frames are in memory (an array,
    tensor or list of frames), else load_video's default."""
    if isinstance(video, (str, os.PathLike)) or not hasattr(video, "__len__"):
        return {}
    return {"max_frames": max(len(video), 1)}
