"""The ``vlmkit`` command's argument types and help format: every bad flag value is refused by argparse
(exit 2, one line naming the fix) before a model loads, instead of a traceback minutes later."""

import argparse
import math
import re
from pathlib import Path

from .io.dtype_names import DTYPE_ALIASES

DTYPES = ("auto", *DTYPE_ALIASES)  # every name the loader takes (bf16, fp16, half...)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show or the help says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if "default" in help_text or nothing:
            return help_text
        return super()._get_help_string(action)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (counts, sizes, token budgets)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (``--top-k``, where 0 means off)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds, for instance)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (temperature, guidance)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def guidance_scale(text: str) -> float:
    """A classifier-free guidance weight from 0 to ``MAX_GUIDANCE_SCALE`` (the server's bound)."""
    from .generation.image_step import MAX_GUIDANCE_SCALE  # with torch: only once an option is read

    value = _number(text)
    if not 0 <= value <= MAX_GUIDANCE_SCALE:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_GUIDANCE_SCALE:g}, got {text} (the model's "
                                         f"default is 5)")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (``--top-p``)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


def seed(text: str) -> int:
    """A seed torch's generators take: a whole number from -2**63 to 2**64 - 1."""
    from .generation.config import SEED_RANGE  # with torch: only once an option is read

    value = _integer(text)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value


def device(text: str) -> str:
    """A device torch knows and this machine has: auto, cpu, cuda, cuda:N (or mps where there is one)."""
    import torch

    if text == "auto":
        return text
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA device here; "
                                             f"use --device cpu")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has {count} CUDA device(s): "
                                             f"use cuda:0 to cuda:{count - 1}")
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no MPS device here; use --device cpu")
    elif chosen.type != "cpu":
        raise argparse.ArgumentTypeError(f"vlmkit does not run on {text!r}; use cpu, cuda or cuda:N")
    return text


def is_url(text: str) -> bool:
    """Whether a media argument is a URL (fetched later, under the media policy) rather than a path."""
    return bool(_URL.match(text))


def existing_file(text: str) -> str:
    """A path to a file that exists (URLs pass through: they are fetched when the model reads them)."""
    if not text:  # Path("") is ".", a folder: say what is really wrong
        raise argparse.ArgumentTypeError("the path is empty; give a file path or URL")
    if is_url(text):
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    if not path.is_file():
        if path.exists():  # a device, a pipe, a socket: nothing to read an image or video from
            raise argparse.ArgumentTypeError(f"{text} is not a regular file; give an image or video file")
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return str(path)


def text_problem(text: str) -> str | None:
    """What makes ``text`` unusable as a prompt, or None. Python reads bytes that are not UTF-8 in a
    command line (or a terminal in a C locale) as lone surrogates, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = text[err.start].encode("utf-8", "surrogateescape").hex() if 0xDC80 <= ord(text[err.start]) <= 0xDCFF \
            else f"{ord(text[err.start]):04x}"
        return (f"the text is not valid UTF-8 (byte or code 0x{shown} at character {err.start}); check the "
                f"terminal's encoding (e.g. LANG=C.UTF-8) and type it again")
    return None


def question_text(text: str) -> str:
    """A question whose text the tokenizer can take (valid UTF-8)."""
    problem = text_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def prompt_text(text: str) -> str:
    """A prompt with something in it, in valid UTF-8."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; give the text to draw, e.g. \"a red circle\"")
    return question_text(text)


def file_stem(text: str) -> str:
    """A plain file name stem (``vlmkit imagine --name``): no folders, so the PNGs land in -o and nowhere else."""
    problem = text_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name; give a name without / or \\ "
                                         f"(e.g. cat; the folder is -o)")
    if len(text.encode("utf-8")) > 200:
        raise argparse.ArgumentTypeError("is too long for a file name; give at most 200 bytes")
    return text


def model_source(text: str) -> str:
    """``--model``: a checkpoint folder or hub id, never empty (an empty one would quietly mean the default model)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the model is empty; give a checkpoint folder or a cached hub id, or leave "
                                         "--model out for $VLMKIT_MODEL or the built-in model")
    return text


def existing_folder(text: str) -> str:
    """A folder that exists (``--media-root``)."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty; give a folder")
    path = Path(text).expanduser()
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give the folder local images are read from")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return str(path)


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def host_list(text: str) -> str:
    """Comma-separated host names, IP addresses or CIDR networks (``--allowed-hosts``), each checked: an entry
    that is neither a valid network nor a host name (``10.0.0.0/33``) would otherwise match nothing."""
    import ipaddress

    for entry in (item.strip() for item in text.split(",")):
        if not entry:
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
            continue
        except ValueError as err:
            if "/" in entry or entry.replace(".", "").isdigit() or ":" in entry:
                raise argparse.ArgumentTypeError(f"{entry!r} is not a valid IP address or CIDR network ({err})") \
                    from None
        if not _HOST_NAME.match(entry):
            raise argparse.ArgumentTypeError(f"{entry!r} is not a host name, IP address or CIDR network")
    return text


def secret(text: str) -> str:
    """A non-empty key (``--api-key``): an empty one would turn authentication off without saying so."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the key clients must send, or leave --api-key out to "
                                         "serve without one")
    return text
