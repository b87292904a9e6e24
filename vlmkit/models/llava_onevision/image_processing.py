"""LLaVA-OneVision pixel preprocessing: anyres tiling for images (the reference's PIL/numpy backend,
value for value) and the per-frame resize of videos (the reference's torchvision backend).

Images of a single-image prompt go through anyres: the base image plus tiles of the best pinpoint.
Images of a multi-image prompt are padded to a square with the mean colour and resized, one input
each. Video frames are resized straight to the tower's size, never tiled.

A non-square ``size={"height": H, "width": W}`` is taken as the reference takes it: tiles are cut
H x H and every tower input (base image, tiles, frames) is resized to H x W. No checkpoint's tower
reads such inputs (the model refuses them); the processor only matches the reference's outputs.
"""

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ...errors import InputError
from ...io.features import BatchFeature
from ...io.media import load_image
from ...io.pixels import (CLIP_MEAN, CLIP_STD, known_settings, mean_colour, normalized_planes, pad_to_square,
                          rescale_for, square_side, stack_same_shapes)
from ...processor_options import call_with_options, with_image_options
from . import anyres
from .config import DEFAULT_GRID_PINPOINTS


@dataclass
class LlavaOnevisionImageProcessor:
    """Settings come from the checkpoint's image (and video) processor config; the real checkpoints
    use mean = std = 0.5, not the class defaults (CLIP's), so the config must always be read."""

    size: int = 384  # the tile side (the reference's patch_size: size["height"] or size["shortest_edge"])
    output_width: int | None = None  # a non-square size's width; None: tower inputs are size x size
    image_grid_pinpoints: list = field(default_factory=lambda: [list(p) for p in DEFAULT_GRID_PINPOINTS])
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_pad: bool = True
    background_color: tuple[int, ...] | None = None  # multi-image padding: the configured mean's colour

    def __post_init__(self):
        # fixed when the processor is made, as in transformers: a call's own image_mean does not change it
        if self.background_color is None:
            self.background_color = mean_colour(self.image_mean)

    @classmethod
    def from_config(cls, config: dict) -> "LlavaOnevisionImageProcessor":
        """From a ``preprocessor_config.json`` dict (or the ``image_processor`` section of
        ``processor_config.json``, or a video processor config)."""
        known = known_settings(config, ("image_grid_pinpoints", "image_mean", "image_std", "rescale_factor",
                                        "resample", "do_resize", "do_rescale", "do_normalize", "do_pad"))
        if config.get("do_center_crop"):
            raise InputError("center-cropping image processors are not LLaVA-OneVision's; check the checkpoint")
        return cls(**_size_settings(config.get("size") or 384), **known)

    def with_options(self, options: dict) -> "LlavaOnevisionImageProcessor":
        """A copy with one call's options (transformers' names: ``do_rescale``, ``size``...) applied."""
        options = dict(options)
        size = options.pop("size", None)
        updated = with_image_options(self, options, "size", square_side)
        return updated if size is None else replace(updated, **_size_settings(size))

    @property
    def output_size(self) -> anyres.Size:
        """(height, width) every tower input is resized to."""
        return self.size, self.output_width or self.size

    # --- images -------------------------------------------------------------------------------
    def _resize(self, image: Image.Image, size: anyres.Size) -> Image.Image:
        # same size is a copy in PIL too, so tiles that already fit are untouched
        return image.resize((size[1], size[0]), Image.Resampling(self.resample))

    def _normalize(self, pixels: np.ndarray, rescale: float | None) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W] with the reference's arithmetic: rescale in float64
        then cast, normalise in float32."""
        return normalized_planes(pixels, rescale, self.image_mean if self.do_normalize else None, self.image_std)

    def anyres_patches(self, image: Image.Image) -> list[np.ndarray]:
        """The base image resized to ``output_size``, then the tiles (row-major) of the image fitted
        into its best pinpoint and zero-padded to it; uint8 [H, W, 3] each."""
        height, width = image.height, image.width
        target = anyres.select_best_resolution((height, width), self.image_grid_pinpoints)
        fitted = np.asarray(self._resize(image, anyres.fitted_size((height, width), target)))
        (top, bottom), (left, right) = anyres.centered_padding(fitted.shape[:2], target)
        padded = np.pad(fitted, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=0)
        tiles = [padded[i:i + self.size, j:j + self.size]
                 for i in range(0, target[0], self.size) for j in range(0, target[1], self.size)]
        return [np.asarray(self._resize(image, self.output_size))] + tiles

    def square_patch(self, image: Image.Image) -> np.ndarray:
        """The whole image centred on a square of the mean colour (multi-image prompts)."""
        return pad_to_square(np.asarray(image), self.background_color)

    def preprocess_one(self, image, anyres_tiling: bool = True) -> np.ndarray:
        """One image (any source ``load_image`` takes) -> float32 [num_patches, 3, *output_size]."""
        return self._pixel_values(load_image(image), anyres_tiling)

    def _pixel_values(self, image: Image.Image, anyres_tiling: bool) -> np.ndarray:
        patches = self.anyres_patches(image) if anyres_tiling else [self.square_patch(image)]
        rescale = rescale_for(image, self.do_rescale, self.rescale_factor)
        out = []
        for patch in patches:
            if self.do_resize and patch.shape[:2] != self.output_size:
                patch = np.asarray(self._resize(Image.fromarray(patch), self.output_size))
            out.append(self._normalize(patch, rescale))
        return np.stack(out)

    def __call__(self, images, **options) -> BatchFeature:
        """A ``BatchFeature``: ``pixel_values`` [num_images, max_patches, 3, *output_size] (zero patches pad the
        shorter ones), ``image_sizes`` [num_images, 2] as (height, width), ``batch_num_images``.

        ``images``: one image, a flat list (each one anyres, as the reference treats a flat list),
        or a list of lists per prompt (a prompt with several images gets no anyres tiling).
        ``options``: transformers' per-call image options and ``return_tensors`` (default "pt")."""
        if options:
            return call_with_options(self, images, options)
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
            groups = [list(g) for g in images if g]
        elif isinstance(images, (list, tuple)):
            groups = [[i] for i in images]
        else:
            groups = [[images]]
        batch_num_images = [len(g) for g in groups]
        pixel_values, image_sizes = [], []
        for group in groups:
            for image in group:
                image = load_image(image)
                pixel_values.append(self._pixel_values(image, anyres_tiling=len(group) == 1))
                image_sizes.append((image.height, image.width))
        if not pixel_values:
            raise InputError("no images to preprocess")
        if self.do_pad:
            most = max(len(p) for p in pixel_values)
            pixel_values = [np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in pixel_values]
        elif len({len(p) for p in pixel_values}) > 1:
            raise InputError("images with different numbers of anyres patches need do_pad=True to be batched")
        return BatchFeature(pixel_values=torch.from_numpy(stack_same_shapes(pixel_values)),
                            image_sizes=torch.tensor(image_sizes, dtype=torch.long),
                            batch_num_images=torch.tensor(batch_num_images, dtype=torch.long))

    preprocess = __call__

    # --- video frames --------------------------------------------------------------------------
    def preprocess_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Frames uint8 [T, H, W, 3] -> float32 [T, 3, *output_size], as the reference's torchvision
        video processor computes them on the CPU: uint8 bicubic resize with antialiasing (torchvision
        hands uint8 bicubic to torch's native uint8 kernel there; it differs from PIL's bicubic by a
        level or two on under 1% of values), then one fused rescale-and-normalise in float32."""
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
        if self.do_resize and tuple(video.shape[-2:]) != self.output_size:
            if int(self.resample) != int(Image.Resampling.BICUBIC):
                raise InputError("LLaVA-OneVision video frames are resized bicubic; this config asks for "
                                 f"resample={self.resample}")
            video = F.interpolate(video, size=self.output_size, mode="bicubic", antialias=True,
                                  align_corners=False)
        values = video.to(torch.float32)
        if self.do_rescale and self.do_normalize:
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return (values - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        if self.do_normalize:
            return (values - torch.tensor(self.image_mean).view(-1, 1, 1)) / torch.tensor(self.image_std).view(-1, 1, 1)
        return values * self.rescale_factor if self.do_rescale else values


def _size_settings(size) -> dict:
    """``size`` and ``output_width`` for a config's or call's size: a number, ``{"shortest_edge": N}`` or
    ``{"height": H, "width": W}``. Unlike the other families, OneVision's reference takes H != W."""
    if isinstance(size, dict) and size.get("height") and size.get("width") and size["height"] != size["width"]:
        return {"size": int(size["height"]), "output_width": int(size["width"])}
    return {"size": square_side(size), "output_width": None}

