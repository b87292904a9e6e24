"""Pixel arithmetic every family's image processor shares, written once with the reference's exact
numerics: rescale and normalise a uint8 picture (``rescale_for`` pictures made from floats), centre it on a
square of the mean colour, stack a batch, and read a preprocessor config's square size and per-channel
settings."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .media import FROM_FLOAT

# OpenAI CLIP's mean/std: transformers' defaults for these processors (the real checkpoints often
# override them, so a config is always read)
# the image options every family's image processor takes (its config's keys, transformers' names): a call's,
# from_pretrained's, and those save_pretrained writes back when edited
IMAGE_SETTINGS = frozenset({"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                            "image_mean", "image_std", "do_pad"})
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rescale_and_normalize(pixels: np.ndarray, rescale_factor: float | None, mean, std) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [H, W, C]: times ``rescale_factor`` (in float64, then cast, as
    transformers' PIL backend does), then ``(x - mean) / std`` in float32. ``None`` skips a step."""
    values = pixels.astype(np.float32)
    if rescale_factor is not None:
        values = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    if mean is not None:
        values = (values - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return values


def normalized_planes(pixels: np.ndarray, rescale_factor: float | None, mean, std) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W] (contiguous), each value exactly what ``rescale_and_normalize``
    gives: the arithmetic is per value and channel, so it runs once on the 256 possible values of each
    channel and the picture is looked up in that table (a gather instead of float64 passes over every
    pixel)."""
    channels = pixels.shape[2]
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, channels))
    table = rescale_and_normalize(np.ascontiguousarray(levels), rescale_factor, mean, std)[:, 0, :]
    planes = np.empty((channels, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(channels):
        np.take(table[:, channel], pixels[..., channel], out=planes[channel])
    return planes


def rescale_for(image, do_rescale: bool, rescale_factor: float) -> float | None:
    """The factor that takes ``image``'s 0..255 values to the model's scale, or None to leave them.

    An image made from float values in [0, 1] was scaled by 255 to become a picture (``io.media``), so
    ``do_rescale=False`` (transformers' way to say "already in [0, 1]") still divides by 255 here, as
    transformers' resize scales floats back after its uint8 round trip. With ``do_rescale=True`` such
    an image is read as the picture it is; transformers would divide by 255 twice."""
    if do_rescale:
        return rescale_factor
    return 1 / 255 if image.info.get(FROM_FLOAT) else None


def stack_same_shapes(pictures: list) -> np.ndarray:
    """One array of equally shaped pictures (numpy arrays or tensors); pictures of different sizes, which
    only ``do_resize=False`` leaves, are an error that says so."""
    shapes = {tuple(p.shape) for p in pictures}
    if len(shapes) > 1:
        raise InputError(f"the images came out in different sizes ({', '.join(str(s) for s in sorted(shapes))}), so "
                         f"they cannot form one batch: leave do_resize on (and do_pad), or pass one image per call")
    return np.stack([np.asarray(p) for p in pictures])


def mean_colour(mean) -> tuple[int, ...]:
    """The padding colour of a normalisation mean: ``int(m * 255)`` per channel (the reference
    truncates, so 0.5 gives 127)."""
    return tuple(int(m * 255) for m in mean)


def pad_to_square(pixels: np.ndarray, colour) -> np.ndarray:
    """Centre ``pixels`` [H, W, C] on a square canvas filled with ``colour``; square input is returned as is."""
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    canvas = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    canvas[...] = np.asarray(colour, dtype=pixels.dtype)
    if width > height:
        top = (side - height) // 2
        canvas[top:top + height] = pixels
    else:
        left = (side - width) // 2
        canvas[:, left:left + width] = pixels
    return canvas


def square_side(size) -> int:
    """The side of a square image size as a preprocessor config or call writes it: a number,
    ``{"height": N, "width": N}`` or ``{"shortest_edge": N}``."""
    if isinstance(size, dict):
        if size.get("height") and size.get("width"):
            if size["height"] != size["width"]:
                raise InputError(f"this model needs a square image size, got {size}")
            return int(size["height"])
        if size.get("shortest_edge"):
            return int(size["shortest_edge"])
    elif isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0:
        return int(size)
    raise InputError(f"unsupported image size {size!r}; give a number or {{'height': N, 'width': N}}")


def size_dict(size) -> dict:
    """A size as transformers' image processors hold it: a number is ``{"height": N, "width": N}``; a dict gives
    ``{"height": H, "width": W}`` or ``{"shortest_edge": N}`` (the shorter side, the aspect ratio kept)."""
    if isinstance(size, dict):
        if size.get("height") and size.get("width"):
            return {"height": int(size["height"]), "width": int(size["width"])}
        if size.get("shortest_edge") and not size.get("longest_edge"):
            return {"shortest_edge": int(size["shortest_edge"])}
    elif isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0:
        return {"height": int(size), "width": int(size)}
    raise InputError(f"unsupported image size {size!r}; give a number, {{'height': H, 'width': W}} or "
                     f"{{'shortest_edge': N}}")


def resized_shape(size: dict, height: int, width: int) -> tuple[int, int]:
    """(height, width) an image of ``height`` x ``width`` is resized to for a ``size_dict``: the shortest edge
    to N and the other truncated to keep the ratio, as transformers' ``get_resize_output_image_size``."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    short, long = sorted((height, width))
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def known_settings(config: dict, keys: tuple[str, ...]) -> dict:
    """The ``keys`` a preprocessor config sets (not null), with a scalar mean or std spread to three channels."""
    known = {k: config[k] for k in keys if config.get(k) is not None}
    for key in ("image_mean", "image_std"):
        if key in known and not isinstance(known[key], (list, tuple)):
            known[key] = [known[key]] * 3
    return known
