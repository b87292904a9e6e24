"""Config dataclasses built from ``config.json`` dicts in the checkpoint's own key names, and written back
in them (``to_dict``, ``save_pretrained``, and a model's ``save_pretrained`` carrying edits made since loading)."""

import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict | None, **overrides) -> T:
    """Build ``cls`` from ``values``: known keys become fields (None means "use the default"), unknown
    keys are kept in the instance's ``extra`` dict instead of failing."""
    merged = {**(values or {}), **overrides}
    known = {f.name for f in fields(cls)} - {"extra"}
    instance = cls(**{k: v for k, v in merged.items() if k in known and v is not None})
    if "extra" in {f.name for f in fields(cls)}:
        instance.extra = {k: v for k, v in merged.items() if k not in known}
    return instance


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
