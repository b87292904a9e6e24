"""Config dataclasses built from ``config.json`` dicts in the checkpoint's own key names, and written back
in them (``to_dict``, ``save_pretrained``, and a model's ``save_pretrained`` carrying edits made since loading)."""

import copy
import functools
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import torch

from .errors import CheckpointError, InputError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict | None, where: str | None = None, **overrides) -> T:
    """Build ``cls`` from ``values``: known keys become fields (None means "use the default"), unknown
    keys are kept in the instance's ``extra`` dict instead of failing.

    ``where`` (a file, or a section as "config.json: text_config"): the values come from a checkpoint file, so a value of the
    wrong JSON type for its field (a string for an int, a list for a section) is a ``CheckpointError``
    naming the key there, raised before any tensor is sized from it."""
    if values is not None and not isinstance(values, dict):
        raise CheckpointError(f"{where or cls.__name__} must be a JSON object ({{...}}), got "
                              f"{json_type(values)} {_short(values)}; fix that section of the file")
    merged = {**(values or {}), **overrides}
    known = {f.name for f in fields(cls)} - {"extra"}
    if where is not None:
        check_field_types(cls, {k: v for k, v in merged.items() if k in known and v is not None}, where)
    instance = cls(**{k: v for k, v in merged.items() if k in known and v is not None})
    if "extra" in {f.name for f in fields(cls)}:
        instance.extra = {k: v for k, v in merged.items() if k not in known}
    return instance


def config_class(cls: type[T]) -> type[T]:
    """``@dataclass`` for a config class that is also built by keyword as transformers' class of that name is
    (``JanusVisionConfig(hidden_size=...)``): keyword arguments it has no field for (transformers' own:
    ``initializer_range``, ``attention_dropout``, ``rope_parameters``...) are kept in ``extra``, as a
    config.json's unknown keys are, and written back by ``to_dict``."""
    cls = dataclass(cls)
    known = {f.name for f in fields(cls)} - {"extra"}
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args, extra: dict | None = None, **kwargs):
        extra = dict(extra or {})
        for key in [k for k in kwargs if k not in known]:
            extra[key] = kwargs.pop(key)
        generated(self, *args, extra=extra, **kwargs)

    cls.__init__ = __init__
    return cls


def sub_config(value, expected: type[T], build, owner: str, name: str) -> T:
    """A composite config's section (``JanusConfig(vision_config=...)``) as transformers takes it: an
    ``expected`` config object is kept; None (the section's defaults), a dict in config.json's key names,
    another vlmkit config or a transformers config object (both read through ``to_dict``) are built by
    ``build(dict | None)``."""
    if isinstance(value, expected):
        return value
    if value is not None and not isinstance(value, dict):
        if not callable(getattr(value, "to_dict", None)):
            raise InputError(f"{owner}({name}=...) takes a config object, a dict of its keys or None, got "
                             f"{type(value).__name__}; pass {expected.__name__}(...) or a dict")
        value = value.to_dict()
    return build(value)


def check_field_types(cls, values: dict, where: str) -> None:
    """Refuse a value whose JSON type does not fit the int/float/bool/str (or list of them, or a union of
    those) annotation of ``cls``'s field of that name; fields of other types are not checked. The message
    names the key as ``where.key`` and the type expected."""
    annotations = {f.name: f.type for f in fields(cls)}
    for key, value in values.items():
        expected = annotations.get(key)
        if expected is not None and value is not None and not _fits(value, expected):
            raise CheckpointError(f"{key_name(where, key)} is {json_type(value)} {_short(value)}, but it must be "
                                  f"{_describe(expected)}; fix the value in the file")


def check_heads_divide(width_name: str, width: int, heads_name: str, heads: int,
                       attention: str = "the attention") -> None:
    """Refuse a width its attention heads do not split evenly, naming both keys (as the file spells them)."""
    if heads < 1 or width % heads:
        raise CheckpointError(f"{width_name} ({width}) is not a multiple of {heads_name} ({heads}); {attention} "
                              f"splits the width evenly over its heads")


def key_name(where: str, key: str) -> str:
    """``key`` as found in ``where``: "config.json: vocab_size", "config.json: text_config.vocab_size"."""
    return f"{where}: {key}" if where.endswith(".json") else f"{where}.{key}"


def _fits(value, expected) -> bool:
    if expected is bool:
        return isinstance(value, bool) or value in (0, 1) and type(value) is int  # 0/1 as old configs write
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        options = [a for a in typing.get_args(expected) if a is not type(None)]
        return any(_fits(value, a) for a in options) or not all(_checked(a) for a in options)
    if typing.get_origin(expected) is list and typing.get_args(expected):
        return isinstance(value, list) and all(_fits(v, typing.get_args(expected)[0]) for v in value)
    return True  # dicts, bare lists, tuples, callables: not checked here


def _checked(expected) -> bool:
    return expected in (bool, int, float, str) or (typing.get_origin(expected) is list
                                                   and bool(typing.get_args(expected)))


def _describe(expected) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if expected in names:
        return names[expected]
    if typing.get_origin(expected) is list:
        return f"a list of {_describe(typing.get_args(expected)[0]).removeprefix('a ').removeprefix('an ')}s"
    options = [a for a in typing.get_args(expected) if a is not type(None)]
    return " or ".join(_describe(a) for a in options) + (" (or null)" if type(None) in typing.get_args(expected)
                                                          else "")


def json_type(value) -> str:
    """What JSON calls ``value``'s type, with its article ("a string", "a list")."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else f"a {type(value).__name__}"


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ConfigFile:
    """What transformers' configs offer for writing themselves: ``to_dict``, ``to_json_string`` and
    ``save_pretrained``, in the checkpoint's key names. Attributes set after loading (``config.use_cache =
    False``) are written too; names starting with an underscore are the loader's own."""

    def to_dict(self) -> dict:
        """The config as config.json holds it: the keys kept unread, then every field and attribute (a
        nested config as its own dict; a dtype as its name)."""
        values = copy.deepcopy(getattr(self, "extra", {}))
        if isinstance(getattr(type(self), "model_type", None), str):
            values["model_type"] = type(self).model_type
        for name, value in vars(self).items():
            if name != "extra" and not name.startswith("_"):
                values[name] = _plain(value)
        return values

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory) -> Path:
        """Write config.json into ``save_directory``; returns the folder."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(self.to_json_string(), encoding="utf-8")
        return out


def _plain(value):
    if isinstance(value, ConfigFile):
        return value.to_dict()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return copy.deepcopy(value)


def with_edits(raw: dict, loaded: dict, now: dict) -> dict:
    """``raw`` (a checkpoint's config.json) with what changed between ``loaded`` and ``now`` (two ``to_dict``
    views of its config, at load time and at save time): keys the config reads in its own way (filled
    defaults, aliases) stay as the file had them unless they were edited."""
    merged = copy.deepcopy(raw)
    for key, value in now.items():
        before = loaded.get(key)
        if value == before and key in loaded:
            continue
        if isinstance(value, dict) and isinstance(before, dict) and isinstance(raw.get(key), dict):
            merged[key] = with_edits(raw[key], before, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
