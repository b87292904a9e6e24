"""The shapes world as a training data source: scenes drawn fresh for every example (what
``data.source: "shapes"`` in a recipe names), and a writer of fixed shapes data sets in the general
trainer's JSONL format."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..train.data import GenerationExample, UnderstandingExample
from .label_heads import patch_classes
from .shapes import QUESTION_TYPES, canonical, generation_caption, question_about, render, sample_scene


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


def shapes_source(data, image_size: int, token_side: int | None = None) -> ShapesSource:
    """The shapes source of a recipe's ``data`` section; ``token_side``: the VQ's downsampling factor
    (pixels per image token side), the grid ``data.canonical_on_token_grid`` snaps to."""
    if data.canonical_on_token_grid and not data.canonical_generation:
        raise InputError("data.canonical_on_token_grid needs data.canonical_generation")
    return ShapesSource(image_size, data.questions_per_image, data.two_object_share, data.canonical_generation,
                        token_side if data.canonical_on_token_grid else None)


def write_shapes_dataset(folder, count: int, seed: int, image_size: int = 64) -> tuple[Path, Path]:
    """Write ``count`` scenes as PNGs with understanding.jsonl and generation.jsonl (the JSONL format
    of ``train.data``), e.g. to fine-tune on a fixed set or as an example of the format."""
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
