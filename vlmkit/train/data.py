"""Training examples and where they come from: the shapes world drawn on the fly, or JSONL files.

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

from ..data.shapes import (COLOURS, POSITIONS, QUESTION_TYPES, SHAPES, Scene, canonical, generation_caption,
                           patch_labels, question_about, render, sample_scene)
from ..errors import InputError


@dataclass
class UnderstandingExample:
    """An image and a conversation about it: messages with ``role`` and plain-text ``content``."""

    image: Image.Image
    messages: list[dict]
    scene: Scene | None = None  # shapes world: what the image shows (for patch labels)
    subjects: list[int | None] | None = None  # shapes world: per answer, the object its question asks about


@dataclass
class GenerationExample:
    """An image and the caption that should produce it."""

    image: Image.Image
    caption: str


class ShapesSource:
    """Scenes of the shapes world, drawn fresh for every example."""

    def __init__(self, image_size: int, questions_per_image: int = 1, two_object_share: float = 0.5,
                 canonical_generation: bool = False, canonical_grid: int | None = None):
        self.image_size = image_size
        self.questions_per_image = questions_per_image
        self.two_object_share = two_object_share
        self.canonical_generation = canonical_generation
        self.canonical_grid = canonical_grid  # pixels: canonical centres snap to multiples of it

    def understanding(self, rng: random.Random, easy: bool = False) -> UnderstandingExample:
        """A scene and a conversation about it: ``questions_per_image`` questions of distinct types
        in random order (one turn each); ``easy``: one object, asked its colour or shape."""
        scene = self.scene(rng, easy)
        kinds = ("colour", "shape") if easy else QUESTION_TYPES
        count = min(self.questions_per_image, len(kinds))
        messages, subjects = [], []
        for kind in ([rng.choice(kinds)] if count == 1 else rng.sample(kinds, count)):
            question = question_about(scene, kind, rng)
            messages += [{"role": "user", "content": question.text}, {"role": "assistant", "content": question.answer}]
            subjects.append(question.subject)
        return UnderstandingExample(render(scene, self.image_size), messages, scene, subjects)

    def scene(self, rng: random.Random, easy: bool = False):
        """An understanding example's scene: one object when ``easy``, else two objects with
        probability ``two_object_share``."""
        if easy:
            return sample_scene(rng, 1)
        if self.two_object_share == 0.5:  # sample_scene's own even draw: recipes from before the option see the same scenes
            return sample_scene(rng)
        return sample_scene(rng, 2 if rng.random() < self.two_object_share else 1)

    def patch_example(self, rng: random.Random, patch: int) -> tuple[Image.Image, dict[str, list[int]]]:
        """An understanding scene's image and its ``patch_classes``."""
        scene = self.scene(rng)
        return render(scene, self.image_size), patch_classes(scene, self.image_size, patch)

    def generation(self, rng: random.Random) -> GenerationExample:
        scene = sample_scene(rng)
        if self.canonical_generation:
            scene = canonical(scene, self.canonical_grid / self.image_size if self.canonical_grid else None)
        return GenerationExample(render(scene, self.image_size), generation_caption(scene, rng))

    def image(self, rng: random.Random) -> Image.Image:
        """A picture for the VQ-VAE: with canonical generation, a generation target (what it will
        encode, and what patchwise codes must spell exactly); else any scene."""
        if self.canonical_generation:
            return self.generation(rng).image
        return render(sample_scene(rng), self.image_size)


# What each patch token is taught to tell (``patch_classes``), and each label's values; class 0 is the background.
PATCH_LABELS = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS}


def patch_classes(scene: Scene, image_size: int, patch: int) -> dict[str, list[int]]:
    """For each ``patch``-px cell of the scene's rendering (row by row) and each of ``PATCH_LABELS``,
    the class of the object the cell shows: 0 for background, else 1 + the index of the object's
    shape / colour / position (so a token also says where its object is, which its own place in
    the grid does not say by itself)."""
    cells = patch_labels(scene, image_size, patch)
    out = {}
    for name, values in PATCH_LABELS.items():
        classes = [0] + [1 + values.index(getattr(obj, name)) for obj in scene.objects]
        out[name] = [classes[c] for c in cells]
    return out


def named_classes(question: str) -> dict[str, int]:
    """For each of ``PATCH_LABELS``, the class of the value the question names ("Where is the red
    circle?": colour red, shape circle), 0 where it names none (or more than one)."""
    words = set(question.replace("?", " ").replace(".", " ").split())
    out = {}
    for name, values in PATCH_LABELS.items():
        named = [index for index, value in enumerate(values) if value in words]
        out[name] = 1 + named[0] if len(named) == 1 else 0
    return out


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


def make_source(data, image_size: int, token_side: int | None = None):
    """The source a recipe's ``data`` section names; ``token_side``: the VQ's downsampling factor
    (pixels per image token side), the grid ``data.canonical_on_token_grid`` snaps to."""
    if data.source == "shapes":
        if data.canonical_on_token_grid and not data.canonical_generation:
            raise InputError("data.canonical_on_token_grid needs data.canonical_generation")
        return ShapesSource(image_size, data.questions_per_image, data.two_object_share, data.canonical_generation,
                            token_side if data.canonical_on_token_grid else None)
    if data.source == "jsonl":
        return JsonlSource(data.understanding, data.generation)
    raise InputError(f"data.source must be 'shapes' or 'jsonl', got {data.source!r}")


def write_shapes_dataset(folder, count: int, seed: int, image_size: int = 64) -> tuple[Path, Path]:
    """Write ``count`` scenes as PNGs with understanding.jsonl and generation.jsonl (the JSONL format
    above), e.g. to fine-tune on a fixed set or as an example of the format."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    source, rng = ShapesSource(image_size), random.Random(f"dataset:{seed}")
    understanding, generation = [], []
    for index in range(count):
        name = f"images/{index:06d}.png"
        example = source.understanding(rng)
        example.image.save(folder / name)
        understanding.append({"image": name, "conversation": example.messages})
        scene_caption = source.generation(random.Random(f"dataset:{seed}:{index}"))
        scene_caption.image.save(folder / f"images/{index:06d}g.png")
        generation.append({"image": f"images/{index:06d}g.png", "caption": scene_caption.caption})
    paths = folder / "understanding.jsonl", folder / "generation.jsonl"
    for path, records in zip(paths, (understanding, generation)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths
