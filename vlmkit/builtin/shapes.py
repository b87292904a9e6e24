"""The built-in model's world: one or two flat coloured shapes on a plain background.

Everything is a pure function of a ``random.Random``, so a seed names a data set: the training
recipe draws its scenes from one seed namespace and the evaluation from another. Scenes render with
PIL (drawn 4x larger, then box-downsampled for smooth edges), and come with exact answers to
what / what colour / how many / where questions and a caption ("a red circle on the left")."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (250, 140, 0),
    "yellow": (245, 215, 0),
    "green": (40, 170, 60),
    "cyan": (0, 190, 210),
    "blue": (40, 80, 230),
    "purple": (140, 60, 200),
    "pink": (250, 110, 190),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (200, 200, 200), "black": (25, 25, 25)}
POSITIONS = ("left", "right", "top", "bottom", "center")
PAIRS = (("left", "right"), ("top", "bottom"))
QUESTION_TYPES = ("shape", "colour", "count", "position", "describe")
NUMBER_WORDS = ("zero", "one", "two")

# centre of each position as a fraction of the image side (x, y)
_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
            "center": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
            "center": "in the center"}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, where, and its size and jitter as fractions of the image side."""

    shape: str
    colour: str
    position: str
    size: float = 0.4
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two objects (two sit left/right or top/bottom)."""

    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)


def sample_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    """A random scene; two objects never share both shape and colour, so every question is unambiguous."""
    count = num_objects or rng.choice((1, 2))
    background = rng.choice(sorted(BACKGROUNDS))
    if count == 1:
        positions = (rng.choice(POSITIONS),)
        low, high = 0.40, 0.50
    else:
        positions = rng.choice(PAIRS)
        low, high = 0.32, 0.38  # two objects never touch, so the checker sees them apart
    kinds: list[tuple[str, str]] = []
    while len(kinds) < count:
        kind = (rng.choice(SHAPES), rng.choice(sorted(COLOURS)))
        if kind not in kinds:
            kinds.append(kind)
    objects = tuple(SceneObject(shape, colour, position, size=rng.uniform(low, high),
                                dx=rng.uniform(-0.015, 0.015), dy=rng.uniform(-0.015, 0.015))
                    for (shape, colour), position in zip(kinds, positions))
    return Scene(background, objects)


def canonical(scene: Scene, grid: float | None = None) -> Scene:
    """The scene with every object at its layout's middle size and exactly on its position: the
    same caption always renders to the same picture (training generation on these gives the model
    one way to draw each caption, not an average of jittered ones). With ``grid`` (a token's side as
    a fraction of the image's), each centre moves to the nearest multiple of it, so an object sits
    on the token grid the same way at every position and patch-local tokens draw it the same."""
    size = 0.45 if len(scene.objects) == 1 else 0.35
    objects = []
    for o in scene.objects:
        dx = dy = 0.0
        if grid:
            fx, fy = _CENTRES[o.position]
            dx, dy = round(fx / grid) * grid - fx, round(fy / grid) * grid - fy
        objects.append(SceneObject(o.shape, o.colour, o.position, size=size, dx=dx, dy=dy))
    return Scene(scene.background, tuple(objects))


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    import math
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side_px: int, fill) -> None:
    fx, fy = _CENTRES[obj.position]
    cx, cy, side = (fx + obj.dx) * side_px, (fy + obj.dy) * side_px, obj.size * side_px
    half = side / 2
    if obj.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj.shape == "square":
        half *= 0.88  # a square of the same bounding box looks larger than the other shapes
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy + 0.05 * side, half * 1.08), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image ``size`` x ``size``."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, big, COLOURS[obj.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def patch_labels(scene: Scene, size: int, patch: int, min_cover: float = 0.125) -> list[int]:
    """Which object each ``patch`` x ``patch`` cell of the ``size``-px rendering shows, row by row:
    0 for background, else 1 + the object's index, for a cell that object covers at least
    ``min_cover`` of (objects never touch, so at most one does)."""
    cells = size // patch
    labels = [0] * (cells * cells)
    big = size * _SUPERSAMPLE  # the coverage the rendering's anti-aliased pixels show
    for index, obj in enumerate(scene.objects, 1):
        mask = Image.new("L", (big, big), 0)
        _draw_object(ImageDraw.Draw(mask), obj, big, 255)
        mask = mask.crop((0, 0, cells * patch * _SUPERSAMPLE, cells * patch * _SUPERSAMPLE))
        cover = mask.resize((cells, cells), Image.Resampling.BOX).tobytes()  # mean per cell, 0-255
        for cell, value in enumerate(cover):
            if value >= min_cover * 255:
                labels[cell] = index
    return labels


def caption(scene: Scene, with_position: bool = True) -> str:
    """"a red circle on the left", "a red circle on the left and a blue star on the right"."""
    parts = [f"a {o.name} {POSITION_PHRASES[o.position]}" if with_position else f"a {o.name}" for o in scene.objects]
    return " and ".join(parts)


def _plural(shape: str) -> str:
    return shape + "s"


class Question(NamedTuple):
    """A question about a scene: its type (``QUESTION_TYPES``), text, exact answer, and the index of
    the object it asks about (None for count and describe questions, which ask about the whole scene)."""

    type: str
    text: str
    answer: str
    subject: int | None


def scene_questions(scene: Scene, rng: random.Random | None = None) -> list[Question]:
    """Every question that is unambiguous for the scene; "colour" is spelt either way when ``rng``
    is given."""
    rng = rng or random.Random(0)
    colour_word = rng.choice(("colour", "color"))
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    out: list[Question] = []
    for index, o in enumerate(objs):
        def add(kind: str, text: str, answer: str) -> None:
            out.append(Question(kind, text, answer, index))
        if colours.count(o.colour) == 1:
            add("shape", f"What shape is the {o.colour} object?", o.shape)
        if shapes.count(o.shape) == 1:
            add("colour", f"What {colour_word} is the {o.shape}?", o.colour)
        add("position", f"Where is the {o.name}?", o.position)
        if len(objs) == 2:
            add("shape", f"What shape is {POSITION_PHRASES[o.position]}?", o.shape)
            add("colour", f"What {colour_word} is the shape {POSITION_PHRASES[o.position]}?", o.colour)
    if len(objs) == 1:
        o = objs[0]
        out.append(Question("shape", "What shape is this?", o.shape, 0))
        out.append(Question("colour", f"What {colour_word} is the shape?", o.colour, 0))
        out.append(Question("position", f"Where is the {o.shape}?", o.position, 0))
    out.append(Question("count", "How many shapes are there?", NUMBER_WORDS[len(objs)], None))
    asked = rng.choice(SHAPES)
    out.append(Question("count", f"How many {_plural(asked)} are there?", NUMBER_WORDS[shapes.count(asked)], None))
    for text in ("What is in this image?", "Describe the image."):
        out.append(Question("describe", text, caption(scene), None))
    return out


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str, str]]:
    """Every (type, question, exact answer) that is unambiguous for the scene (``scene_questions``
    without the subject)."""
    return [(q.type, q.text, q.answer) for q in scene_questions(scene, rng)]


def question_about(scene: Scene, kind: str, rng: random.Random) -> Question:
    """One random question of the given type for the scene."""
    return rng.choice([q for q in scene_questions(scene, rng) if q.type == kind])


def question_of_type(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One random (question, answer) of the given type for the scene."""
    question = question_about(scene, kind, rng)
    return question.text, question.answer


def generation_caption(scene: Scene, rng: random.Random, without_position: float = 0.4) -> str:
    """The caption a text-to-image example is trained on: the full caption, or for one object often
    just "a red circle" (so prompts that leave the position open work too)."""
    if len(scene.objects) == 1 and rng.random() < without_position:
        return caption(scene, with_position=False)
    return caption(scene)


def text_corpus(count: int = 3000, seed: int = 0) -> list[str]:
    """Questions, answers and captions of the domain, for training a tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = sample_scene(rng)
        out.append(caption(scene))
        out.append(caption(scene, with_position=False))
        out.extend(f"{q} {a}" for _, q, a in questions(scene, rng))
    out += [" ".join(SHAPES), " ".join(COLOURS), " ".join(POSITIONS), " ".join(NUMBER_WORDS)]
    return out
