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
from .jsontext import parse_json


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
        return UnderstandingExample(self._image(record["image"]), [plain_message(m) for m in record["conversation"]])

    def generation(self, rng: random.Random) -> GenerationExample | None:
        if not self.generation_records:
            return None
        record = rng.choice(self.generation_records)
        return GenerationExample(self._image(record["image"]), record["caption"])

    def image(self, rng: random.Random) -> Image.Image:
        return self._image(rng.choice(self.understanding_records + self.generation_records)["image"])


def plain_message(message) -> dict:
    """A JSONL conversation message as the training rows take it: its role and its text (content blocks'
    texts joined; the image is the record's own)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content blocks: keep the text, the image is the record's
        content = " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") \
            or not isinstance(content, str):
        raise InputError(f"conversation messages need a role 'user' or 'assistant' and text content, got {message!r}")
    return {"role": message["role"], "content": content}


def _check_text(record, where: str) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800") and Python reads it into a string no tokenizer
    (or file system) takes: refused here rather than as a TypeError at the step that draws the line."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise InputError(f"{where} holds a lone surrogate \\u{ord(bad):04x} (half of a UTF-16 pair, after "
                         f"{text[max(0, err.start - 20):err.start]!r}); write the character itself or its full "
                         f"pair of escapes, or remove the line") from None


def _check_record(record, keys: tuple[str, ...], where: str) -> None:
    """One JSONL line's fields, checked as it is read: a bad line found at step 5,000 costs the run."""
    if not isinstance(record, dict):
        raise InputError(f"{where} must be a JSON object with {', '.join(keys)}, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(record["image"], str) or not record["image"]:
        raise InputError(f"{where}: image must be a path (relative to the JSONL file), got {record['image']!r}")
    if "caption" in keys and not (isinstance(record["caption"], str) and record["caption"].strip()):
        raise InputError(f"{where}: caption must be non-empty text, got {record['caption']!r}")
    if "conversation" in keys:
        conversation = record["conversation"]
        if not isinstance(conversation, list) or not conversation:
            raise InputError(f"{where}: conversation must be a non-empty list of messages")
        try:
            roles = [plain_message(m)["role"] for m in conversation]
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        if roles[0] != "user" or "assistant" not in roles:
            raise InputError(f"{where}: a conversation must start with the user's turn and hold at least one "
                             f"assistant answer to learn")


def _check_image(path: Path, where: str) -> None:
    if not path.is_file():
        raise InputError(f"{where}: image {path} does not exist (paths are relative to the JSONL file)")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises a zoo of types (OSError, SyntaxError, struct.error...) for bad files
        raise InputError(f"{where}: image {path} cannot be read ({err}); fix or remove the line") from None


def _read_jsonl(path: str | None, keys: tuple[str, ...]) -> list[dict]:
    if not path:
        return []
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"data file {path} is a folder; give the JSONL file")
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    records, checked = [], set()
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where} is not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            record = parse_json(line, f"{where} is")
            _check_text(record, where)
            _check_record(record, keys, where)
            record["where"] = where  # for errors found later (a row longer than the model's context)
            record["image"] = (path.parent / record["image"]).resolve()
            if record["image"] not in checked:
                _check_image(record["image"], where)
                checked.add(record["image"])
            records.append(record)
    if not records:
        raise InputError(f"data file {path} holds no examples; add lines like {{{', '.join(f'{k!r}: ...' for k in keys)}}}"
                         f" or leave it out of the recipe")
    return records


def jsonl_source(data) -> JsonlSource:
    """The source of a recipe's ``data`` section when it names JSONL files (the shapes world's source
    is ``builtin.source.ShapesSource``)."""
    if data.source != "jsonl":
        raise InputError(f"data.source must be 'shapes' or 'jsonl', got {data.source!r}")
    return JsonlSource(data.understanding, data.generation)
