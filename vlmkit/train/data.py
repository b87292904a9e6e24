"""Training examples and where they come from: JSONL files (the shapes world, drawn on the fly, is
``builtin.source``).

Understanding lines: ``{"image": "a.png", "conversation": [{"role": "user", "content": "What colour
is the circle?"}, {"role": "assistant", "content": "red"}]}`` (more turns allowed; the image belongs to
the first user turn). Generation lines: ``{"image": "a.png", "caption": "a red circle on the left"}``.
Image paths are relative to the JSONL file. Every draw takes a ``random.Random``, so a step's batch
is a pure function of (seed, step) and a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import InputError


@dataclass
class UnderstandingExample:
    """An image and a conversation about it: messages with ``role`` and plain-text ``content``."""

    image: Image.Image
    messages: list[dict]
    scene: object | None = None  # shapes world: the ``builtin.shapes.Scene`` the image shows (for patch labels)
    subjects: list[int | None] | None = None  # shapes world: per answer, the object its question asks about


@dataclass
class GenerationExample:
    """An image and the caption that should produce it."""

    image: Image.Image
    caption: str


class JsonlSource:
    """Examples from JSONL files (either may be missing); images are read once and kept."""

    def __init__(self, understanding: str | None, generation: str | None):
        self.understanding_records = _read_jsonl(understanding, ("image", "conversation"))
        self.generation_records = _read_jsonl(generation, ("image", "caption"))
        if not self.understanding_records and not self.generation_records:
            raise InputError("the recipe's data names no examples: give data.understanding and/or data.generation "
                             "JSONL files")
        self._images: dict[Path, Image.Image] = {}

    def _image(self, path: Path) -> Image.Image:
        if path not in self._images:
            from ..io.media import load_image
            self._images[path] = load_image(str(path)).convert("RGB")
        return self._images[path]

    def understanding(self, rng: random.Random, easy: bool = False) -> UnderstandingExample | None:
        if not self.understanding_records:
            return None
        record = rng.choice(self.understanding_records)
        return UnderstandingExample(self._image(record["image"]), [_plain_message(m) for m in record["conversation"]])

    def generation(self, rng: random.Random) -> GenerationExample | None:
        if not self.generation_records:
            return None
        record = rng.choice(self.generation_records)
        return GenerationExample(self._image(record["image"]), record["caption"])

    def image(self, rng: random.Random) -> Image.Image:
        return self._image(rng.choice(self.understanding_records + self.generation_records)["image"])


def _plain_message(message: dict) -> dict:
    content = message.get("content")
    if isinstance(content, list):  # content blocks: keep the text, the image is the record's
        content = " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    if message.get("role") not in ("user", "assistant") or not isinstance(content, str):
        raise InputError(f"conversation messages need a role 'user' or 'assistant' and text content, got {message!r}")
    return {"role": message["role"], "content": content}


def _read_jsonl(path: str | None, keys: tuple[str, ...]) -> list[dict]:
    if not path:
        return []
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number} is not valid JSON: {err}") from None
        missing = [k for k in keys if k not in record]
        if missing:
            raise InputError(f"{path}:{number} lacks {', '.join(missing)}")
        record["image"] = (path.parent / record["image"]).resolve()
        records.append(record)
    return records


def jsonl_source(data) -> JsonlSource:
    """The source of a recipe's ``data`` section when it names JSONL files (the shapes world's source
    is ``builtin.source.ShapesSource``)."""
    if data.source != "jsonl":
        raise InputError(f"data.source must be 'shapes' or 'jsonl', got {data.source!r}")
    return JsonlSource(data.understanding, data.generation)
