"""IDEFICS image preprocessing: every image to RGB, resized (bicubic) to the configured size (a square, a
height and width, or a shortest edge with the aspect ratio kept), rescaled and normalised with CLIP's
mean/std. Same arithmetic as transformers' PIL backend."""

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ...io.media import flat_image_list, load_image
from ...errors import InputError
from ...io.pixels import (CLIP_MEAN, CLIP_STD, known_settings, normalized_planes, rescale_for, resized_shape,
                          size_dict, stack_same_shapes)
from ...processor_options import call_with_options, with_image_options

IDEFICS_STANDARD_MEAN, IDEFICS_STANDARD_STD = CLIP_MEAN, CLIP_STD  # transformers' names for them
# read only when the image processor is made: transformers 5.23 maps image_size to size in __init__ and its
# preprocess never looks at either, so a call's value changes nothing there
_INIT_ONLY_OPTIONS = ("image_size", "image_num_channels")


@dataclass
class IdeficsImageProcessor:
    """Settings from the checkpoint's processor config (``image_size`` or ``size``, mean/std...).
    ``size``: ``{"height": H, "width": W}`` or ``{"shortest_edge": N}``; None: ``image_size`` square.
    ``image_size`` is then the size's height, as transformers' attribute."""

    image_size: int | None = 224
    image_mean: list[float] = field(default_factory=lambda: list(IDEFICS_STANDARD_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IDEFICS_STANDARD_STD))
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    image_num_channels: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    size: dict | None = None

    def __post_init__(self):
        self.size = size_dict(self.image_size if self.size is None else self.size)
        self.image_size = self.size.get("height")

    @classmethod
    def from_config(cls, config: dict) -> "IdeficsImageProcessor":
        """From a ``preprocessor_config.json`` dict or the ``image_processor`` entry of ``processor_config.json``."""
        known = known_settings(config, ("image_mean", "image_std", "rescale_factor", "resample",
                                        "image_num_channels", "do_resize", "do_rescale", "do_normalize"))
        # image_size wins over size, as transformers' __init__ turns it into the size
        return cls(size=size_dict(config.get("image_size") or config.get("size") or 224), **known)

    def with_options(self, options: dict) -> "IdeficsImageProcessor":
        """A copy with one call's options (transformers' names: ``size``, ``do_rescale``...) applied.
        ``do_pad`` changes nothing: images are resized to the size, with nothing to pad (transformers'
        IDEFICS image processor ignores it too); so do ``image_size`` and ``image_num_channels``, which
        transformers reads only when the processor is made (a warning says so)."""
        ignored = sorted(k for k in options if k in _INIT_ONLY_OPTIONS)
        if ignored:
            warnings.warn(f"{', '.join(ignored)} of a call changes nothing (transformers reads it only when the "
                          f"image processor is made); pass size={{'height': N, 'width': N}} to resize, or give it "
                          f"to from_pretrained", stacklevel=4)
        options = {k: v for k, v in options.items() if k != "do_pad" and k not in _INIT_ONLY_OPTIONS}
        return with_image_options(self, options, "size", size_dict)

    @property
    def image_dims(self) -> tuple[int, int, int]:
        """(channels, height, width) of one processed image (the zero images that pad a batch)."""
        if "shortest_edge" not in self.size:
            return self.image_num_channels, self.size["height"], self.size["width"]
        raise InputError(f"with size={self.size} the images have no fixed size, so a prompt without images cannot be "
                         f"padded to the batch's; give size={{'height': N, 'width': N}}, or an image in every prompt")

    def preprocess_one(self, image) -> torch.Tensor:
        """One image (anything ``load_image`` takes) to float32 [3, H, W] (the ``size`` it is resized to)."""
        image = load_image(image)
        rescale = rescale_for(image, self.do_rescale, self.rescale_factor)  # before resizing drops image.info
        if self.do_resize:
            height, width = resized_shape(self.size, image.height, image.width)
            image = image.resize((width, height), Image.Resampling(self.resample))
        pixels = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(normalized_planes(pixels, rescale,
                                                  self.image_mean if self.do_normalize else None, self.image_std))

    def __call__(self, images, transform=None, return_tensors=None, **options):
        """Pixel values of one image or a list, as transformers' IdeficsImageProcessor returns them: a tensor
        [N, 3, size, size] with ``return_tensors="pt"``, a numpy array with "np", a list of [3, size, size]
        arrays without. ``transform`` (a callable on each RGB PIL image returning a tensor, e.g. torchvision's
        training augmentations) replaces the preset steps; ``options``: transformers' per-call image options
        (``size``, ``do_rescale``...)."""
        if options:
            return call_with_options(self, images, options, transform=transform, return_tensors=return_tensors)
        images = flat_image_list(images)  # a list of per-sample lists too, as transformers takes
        if transform is not None:
            pixels = torch.stack([transform(load_image(image)) for image in images])
        else:
            pixels = torch.from_numpy(stack_same_shapes([self.preprocess_one(image) for image in images]))
        if return_tensors == "pt":
            return pixels
        return pixels.numpy() if return_tensors == "np" else list(pixels.numpy())

    preprocess = __call__

    def fetch_images(self, sources):
        """RGB PIL images from URLs (or paths, data URIs...): one for one source, a list for a list."""
        if isinstance(sources, (list, tuple)):
            return [self.fetch_images(s) for s in sources]
        return load_image(sources)
