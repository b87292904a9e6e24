"""Janus image preprocessing: longest side to the model's size (aspect kept, a minimum side), pad to
a square with the mean colour, rescale and normalise; and the inverse for generated images."""

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ...io.features import BatchFeature
from ...io.media import flat_image_list, load_image
from ...io.pixels import (CLIP_MEAN, CLIP_STD, known_settings, mean_colour, normalized_planes, pad_to_square,
                          rescale_for, square_side, stack_same_shapes)
from ...processor_options import call_with_options, with_image_options


@dataclass
class JanusImageProcessor:
    """Settings come from the checkpoint's preprocessor config. The real checkpoints use mean = std
    = 0.5, unlike the class defaults (CLIP's values), so the config must always be read."""

    size: int = 384
    min_size: int = 14
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_pad: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC
    # transformers rounds the resized side; DeepSeek's original processor truncates it
    resize_rounding: str = "round"
    background_color: tuple[int, int, int] | None = None

    @classmethod
    def from_config(cls, config: dict) -> "JanusImageProcessor":
        """From a ``preprocessor_config.json`` dict (transformers' or the original layout's keys)."""
        known = known_settings(config, ("min_size", "image_mean", "image_std", "rescale_factor", "do_resize",
                                        "do_pad", "do_rescale", "do_normalize", "resample"))
        return cls(size=square_side(config.get("size") or config.get("image_size") or 384), **known)

    def with_options(self, options: dict) -> "JanusImageProcessor":
        """A copy with one call's options (transformers' names: ``do_rescale``, ``size``...) applied.
        A ``resample`` of 0 (NEAREST) or None keeps the configured filter, as transformers' Janus resize
        takes ``resample or self.resample``."""
        if "resample" in options and not options["resample"]:
            options = {k: v for k, v in options.items() if k != "resample"}
        return with_image_options(self, options, "size", square_side)

    def __post_init__(self):
        # the padding colour is the configured mean's; a call's own image_mean does not change it (as in
        # transformers, where it is fixed when the processor is made)
        if self.background_color is None:
            self.background_color = mean_colour(self.image_mean)

    def resize(self, image: Image.Image) -> Image.Image:
        """Longest side to ``size``, the other scaled alike but never below ``min_size`` (bicubic)."""
        width, height = image.size
        scale = self.size / max(width, height)
        to_int = round if self.resize_rounding == "round" else int
        new_height = max(to_int(height * scale), self.min_size)
        new_width = max(to_int(width * scale), self.min_size)
        return image.resize((new_width, new_height), Image.Resampling(self.resample))

    def pad_to_square(self, pixels: np.ndarray) -> np.ndarray:
        """Centre ``pixels`` [H, W, 3] on a square canvas of the background colour."""
        return pad_to_square(pixels, self.background_color)

    def preprocess_one(self, image) -> torch.Tensor:
        """One image (any source ``load_image`` takes) to a float32 tensor [3, size, size]."""
        image = load_image(image)
        rescale = rescale_for(image, self.do_rescale, self.rescale_factor)  # before resizing drops image.info
        if self.do_resize:
            image = self.resize(image)
        pixels = np.asarray(image, dtype=np.uint8)
        if self.do_pad:
            pixels = self.pad_to_square(pixels)
        return torch.from_numpy(normalized_planes(pixels, rescale,
                                                  self.image_mean if self.do_normalize else None, self.image_std))

    def __call__(self, images, **options) -> BatchFeature:
        """``{"pixel_values": [N, 3, size, size]}`` for one image or a list, as a ``BatchFeature``.
        ``options``: transformers' per-call image options and ``return_tensors`` (default "pt")."""
        if options:
            return call_with_options(self, images, options)
        images = flat_image_list(images)  # a list of per-sample lists too, as transformers takes
        return BatchFeature(pixel_values=torch.from_numpy(stack_same_shapes([self.preprocess_one(i) for i in images])))

    preprocess = __call__

    def postprocess(self, images, do_rescale: bool | None = None, rescale_factor: float | None = None,
                    do_normalize: bool | None = None, image_mean=None, image_std=None, input_data_format=None,
                    return_tensors: str | None = None, **unknown) -> dict:
        """Generated images back to pixels: undo normalisation, scale to 0..255, clip, uint8.
        The options are transformers' (None: the processor's setting); ``rescale_factor`` multiplies, so its
        default is ``1 / self.rescale_factor`` (255). ``input_data_format`` is taken and changes nothing, as in
        transformers 5.23, whose arithmetic ignores it.

        Takes tensors or arrays shaped [3, H, W] or [H, W, 3] (the transformers Janus example passes the
        channels-last output of ``decode_image_tokens``), one or a list or a batch, and gives them back in
        that layout, as transformers does: a list, or with ``return_tensors`` "np"/"pt" one stacked array or
        tensor; with ``return_tensors="PIL.Image.Image"`` the ``pixel_values`` are PIL images."""
        if isinstance(images, Image.Image) or (isinstance(images, list) and images and isinstance(images[0], Image.Image)):
            return {"pixel_values": images if isinstance(images, list) else [images]}
        if unknown:
            raise InputError(f"postprocess has no option {', '.join(sorted(unknown))}; it takes do_rescale, "
                             f"rescale_factor, do_normalize, image_mean, image_std, input_data_format, return_tensors")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        scale = 1 / self.rescale_factor if rescale_factor is None else rescale_factor
        arrays, channels_first = _as_hwc_list(images)
        # the reference's arithmetic: un-normalise in float32 as (x + mean/std) * std, then
        # rescale in float64 -> float32, clip and truncate to uint8
        shift, inverse_std = _unnormalize_terms(self.image_mean if image_mean is None else image_mean,
                                                self.image_std if image_std is None else image_std)
        as_pictures = return_tensors == "PIL.Image.Image" and do_normalize and do_rescale
        out = []
        for array in arrays:
            values = array.astype(np.float32)
            if do_normalize:
                values = (values - shift) / inverse_std
            if do_rescale:
                values = (values.astype(np.float64) * scale).astype(np.float32)
                values = values.clip(0, 255).astype(np.uint8)
            out.append(Image.fromarray(values) if as_pictures else values.transpose(2, 0, 1) if channels_first
                       else values)
        if return_tensors in ("np", "pt"):
            out = np.stack(out) if return_tensors == "np" else torch.from_numpy(np.stack(out))
        return {"pixel_values": out}


def _unnormalize_terms(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(-mean / std, 1 / std) per channel in float32, transformers' ``unnormalize`` terms; a number is every
    channel's."""
    mean, std = ([v] * 3 if not isinstance(v, (list, tuple, np.ndarray)) else list(v) for v in (mean, std))
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"image_mean and image_std need 3 values (one per channel) or one number, got {mean}, {std}")
    return (np.asarray([-m / s for m, s in zip(mean, std)], dtype=np.float32),
            np.asarray([1 / s for s in std], dtype=np.float32))


def _as_hwc_list(images) -> tuple[list[np.ndarray], bool]:
    """The images as [H, W, C] arrays, and whether they came channels first (read from the first one, as
    transformers' ``infer_channel_dimension_format``: a first axis of 1 or 3 is channels)."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays, channels_first = [], None
    for image in images:
        array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim != 3 or (array.shape[0] not in (1, 3) and array.shape[-1] not in (1, 3)):
            raise InputError(f"postprocess takes images shaped [3, H, W] or [H, W, 3], got {array.shape}")
        if channels_first is None:
            channels_first = array.shape[0] in (1, 3)
        arrays.append(array.transpose(1, 2, 0) if channels_first else array)
    return arrays, bool(channels_first)
