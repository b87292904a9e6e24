"""The keyword arguments of a processor call, sorted by modality as transformers' processors sort them, and
an image processor's settings with a call's options applied (``io.features.as_return_type`` gives the call's
result the form ``return_tensors`` asks for).

transformers takes every option flat (``processor(..., max_length=8, do_rescale=False)``), grouped
(``text_kwargs={...}``, ``images_kwargs={...}``, ``videos_kwargs={...}``) or as ``common_kwargs``; a
flat option wins over a grouped one, a grouped one over a common one, and a flat image option reaches
the video processor too. An option transformers knows but vlmkit does not implement is an error naming
it; one that no processor knows is ignored with a warning, as transformers does."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace

from .errors import InputError
from .io.features import as_return_type
from .io.tokenizer import TEXT_OPTIONS, TEXT_OPTIONS_NOT_IMPLEMENTED

# options every family's image processor implements (fields of its settings dataclass, ``size`` parsed)
IMAGE_OPTIONS = frozenset({"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                           "image_mean", "image_std", "do_pad"})
# accepted with the values that change nothing here: pixels are made on the CPU, in RGB (vlmkit converts every
# picture, as do_convert_rgb does), channels first, from arrays whose channel axis vlmkit reads as transformers
# infers it; None: any value
IMAGE_OPTIONS_NEUTRAL = {"do_convert_rgb": None, "device": None, "data_format": ("channels_first", None),
                         "disable_grouping": None, "input_data_format": None, "do_center_crop": (False, None),
                         "crop_size": (None,), "pad_size": (None,), "default_to_square": None}
VIDEO_SAMPLING_OPTIONS = frozenset({"do_sample_frames", "num_frames", "fps"})
RETURN_TYPES = ("pt", "np", None)


@dataclass
class CallOptions:
    """One processor call's options by modality, plus ``return_tensors`` and the family's own options."""

    text: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    videos: dict = field(default_factory=dict)
    family: dict = field(default_factory=dict)
    return_tensors: str | None = "pt"


def sort_call_options(kwargs: dict, *, family_text: tuple = (), family_images: tuple = (), videos: bool = False,
                      family: tuple = (), return_tensors: str | None = "pt") -> CallOptions:
    """Sort a processor call's ``kwargs`` into :class:`CallOptions`.

    ``family_text``/``family_images``: the family's own tokenizer-side and image options (e.g. IDEFICS'
    ``add_eos_token``, Janus' ``min_size``); ``videos``: whether the family takes videos; ``family``:
    options the processor handles itself (e.g. ``generation_mode``); ``return_tensors``: its default."""
    kwargs = dict(kwargs)
    common = dict(kwargs.pop("common_kwargs", None) or {})
    grouped = {name: dict(kwargs.pop(f"{name}_kwargs", None) or {}) for name in ("text", "images", "videos")}
    kwargs.pop("audio_kwargs", None)
    text_names = TEXT_OPTIONS | TEXT_OPTIONS_NOT_IMPLEMENTED | set(family_text)
    image_names = IMAGE_OPTIONS | set(IMAGE_OPTIONS_NEUTRAL) | set(family_images)
    video_names = (IMAGE_OPTIONS | set(IMAGE_OPTIONS_NEUTRAL) | VIDEO_SAMPLING_OPTIONS) if videos else frozenset()
    options = CallOptions(return_tensors=return_tensors)
    targets = (("text", text_names), ("images", image_names), ("videos", video_names))
    for source in (common, *(grouped[name] for name in ("text", "images", "videos"))):
        if "return_tensors" in source:
            options.return_tensors = source.pop("return_tensors")
    for name, names in targets:
        section = getattr(options, name)
        section.update({k: v for k, v in common.items() if k in names})
        section.update(grouped[name])
    for key, value in kwargs.items():
        sections = [name for name, names in targets if key in names]
        if key == "return_tensors":
            options.return_tensors = value
        elif key in family:
            options.family[key] = value
        elif sections:
            for name in sections:  # a flat image option reaches the video processor too
                getattr(options, name)[key] = value
        else:
            warnings.warn(f"{key!r} is not an option of this processor and is ignored", stacklevel=3)
    for name in ("text", "images", "videos"):
        for key in list(getattr(options, name)):
            if key in family:  # a family option given inside a group, e.g. text_kwargs={"generation_mode": ...}
                options.family[key] = getattr(options, name).pop(key)
    _refuse_unimplemented(options)
    if options.return_tensors not in RETURN_TYPES:
        raise InputError(f"return_tensors={options.return_tensors!r} is not supported; use 'pt' (torch tensors), "
                         f"'np' (numpy arrays) or None (lists)")
    return options


def _refuse_unimplemented(options: CallOptions) -> None:
    asked = sorted(k for k in options.text if k in TEXT_OPTIONS_NOT_IMPLEMENTED and options.text[k] not in
                   (None, False, 0))
    for section in (options.images, options.videos):
        for key, allowed in IMAGE_OPTIONS_NEUTRAL.items():
            if allowed is not None and key in section and section.pop(key) not in allowed:
                asked.append(key)
            section.pop(key, None)
    if asked:
        raise InputError(f"vlmkit's processors do not implement {', '.join(sorted(set(asked)))}; leave "
                         f"{'it' if len(set(asked)) == 1 else 'them'} out (or at the default)")


def with_image_options(settings, options: dict, size_field: str, parse_size):
    """A copy of an image processor (a settings dataclass) with a call's image ``options`` applied:
    ``size`` is read by ``parse_size`` into ``size_field``, a scalar mean or std applies to every channel."""
    if not options:
        return settings
    options = dict(options)
    if "size" in options:
        size = options.pop("size")
        if size is not None:
            options[size_field] = parse_size(size)
    for key in ("image_mean", "image_std"):
        if key in options and options[key] is not None and not isinstance(options[key], (list, tuple)):
            options[key] = [options[key]] * 3
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"{type(settings).__name__} has no option {', '.join(unknown)}")
    return replace(settings, **{k: v for k, v in options.items() if v is not None})


def call_with_options(image_processor, images, options: dict, **call):
    """An image processor called straight with transformers' per-call options (``size=``,
    ``do_rescale=``, ``return_tensors=``...): its result for a copy with those options applied."""
    own = tuple(f.name for f in fields(image_processor))
    sorted_options = sort_call_options(options, family_images=own)
    if sorted_options.text:
        warnings.warn(f"{', '.join(sorted(sorted_options.text))} are options of the tokenizer, not of an image "
                      f"processor; ignored", stacklevel=3)
    result = image_processor.with_options(sorted_options.images)(images, **call)
    return as_return_type(result, sorted_options.return_tensors) if isinstance(result, dict) else result
