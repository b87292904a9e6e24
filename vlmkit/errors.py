"""vlmkit's exception types: each names the problem and, where it can, what to do about it."""


class VlmkitError(Exception):
    """Base class of every error vlmkit raises on purpose."""


class CheckpointError(VlmkitError):
    """A checkpoint folder is missing, incomplete, of an unknown type or holds wrongly shaped weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs pickle loading that the user has not opted into."""


class MediaError(VlmkitError):
    """An image or video could not be read, fetched or is over a configured limit."""


class TooManyPixels(MediaError):
    """An image is larger (width x height) than the ``max_pixels`` it was loaded with."""


class InputError(VlmkitError, ValueError):
    """A prompt or request does not fit the model: placeholder counts, context length, bad options."""


class TemplateError(VlmkitError):
    """A chat template failed to render or tried something the sandbox forbids."""
