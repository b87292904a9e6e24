"""Config dataclasses built from ``config.json`` dicts in the checkpoint's own key names."""

from dataclasses import fields
from typing import TypeVar

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
