"""A training recipe: model sizes, data, and the stages (VQ-VAE, optionally the vision tower, then the
joint LM), read from a JSON file. Unknown keys are an error here (unlike checkpoint configs): a typo
in a recipe should not silently train something else."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import InputError
from ..generation.config import SEED_RANGE
from ..generation.image_step import MAX_GUIDANCE_SCALE
from ..io.checkpoint import DTYPE_NAMES
from .jsontext import parse_json

VQ_STEPS_FRESH = 1000  # a fresh model's VQ-VAE steps when the recipe names none


@dataclass
class ModelSizes:
    """Sizes of a fresh model. The VQ grid must match the vision patch grid (Janus uses one side)."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 1024  # RoPE: no weights depend on it; room for the CLI's 256 new tokens
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vq_embed_dim: int = 8
    vq_codebook_size: int = 1024
    vq_latent_channels: int = 64
    vq_base_channels: int = 32
    vq_channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2])
    vq_res_blocks: int = 1
    vocab_size: int = 1024  # the tokenizer's target; the model's vocabulary is padded to a multiple of 64


@dataclass
class DataSpec:
    """Where examples come from: ``"shapes"`` draws scenes on the fly; ``"jsonl"`` reads files of
    ``{"image": path, "conversation": [...]}`` (understanding) and ``{"image": path, "caption": text}``
    (generation) lines, image paths relative to the file."""

    source: str = "shapes"
    understanding: str | None = None
    generation: str | None = None
    # shapes only: for the first N LM steps, one object per scene and only colour/shape questions. A
    # model trained from scratch first learns answers from the question alone; easy questions get it
    # to read the image sooner, after which binding attributes to objects comes quickly.
    curriculum_steps: int = 0
    # shapes only: questions asked about each understanding image, as a multi-turn conversation.
    # The image costs most of a row's tokens, so more answers per image are cheap supervision.
    questions_per_image: int = 1
    # shapes only: the share of understanding scenes with two objects (the rest have one). Questions
    # about one of two objects (binding a colour to a shape, counting one kind) are the hard ones.
    two_object_share: float = 0.5
    # shapes only: generation examples drawn at one size and exactly on their position
    # (``shapes.canonical``), so each caption has one picture to learn instead of a jittered spread.
    canonical_generation: bool = False
    # shapes only, with canonical_generation: object centres snapped to the VQ's token grid, so an
    # object covers the same patches at every position (5,195 distinct 8-px patches in the 64-px
    # one-object scenes become 1,043): patchwise tokens then spell each object one way.
    canonical_on_token_grid: bool = False


@dataclass
class VQStage:
    """Train the VQ-VAE (encoder, codebook, decoder) on images."""

    # None: 1000 for a fresh model, 0 with ``init_from`` (a fine-tune keeps the checkpoint's VQ-VAE: its LM
    # and generation head were trained on that codebook's codes); an explicit number always runs.
    steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    commitment: float = 0.25
    foreground_weight: float = 0.0
    restart_dead_codes_every: int = 100
    restart_worst_served: bool = False  # restart at poorly quantised latents (see stages.restart_dead_codes)
    # Train on random crops of this side (aligned to the token grid; 0 = whole images), which is
    # ~(image/crop)^2 times cheaper: the encoder and decoder are convolutional. The last
    # ``full_image_steps`` steps see whole images, so the attention layers adapt to the full grid.
    crop_size: int = 0
    full_image_steps: int = 0
    # Encode each token's patch on its own (``JanusVQVAE.latents``), so identical patches get identical
    # tokens whatever else the picture holds, and the LM learns targets without context noise.
    # Recorded in the checkpoint's config; a fine-tuned model (``init_from``) keeps its own.
    patchwise: bool = False


@dataclass
class VisionStage:
    """Pre-train the vision tower before the LM stage (shapes world only; 0 steps: skip): every
    patch token predicts the shape, colour and position of the object it shows, or background.
    Learning what the tokens show through the LM's answers alone is slow (a few answer tokens per
    image); this is a dense label per token, and the LM stage then only learns to read it."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50


@dataclass
class LMStage:
    """Train everything but the (frozen) VQ-VAE on understanding and generation examples."""

    steps: int = 2000
    understanding_batch: int = 16
    generation_batch: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    caption_dropout: float = 0.1
    generation_loss_weight: float = 1.0
    # Weight of the image tokens that are not their picture's most common code (the background, with
    # patchwise tokens) in the generation loss, relative to the background's: a drawn object's few
    # tokens, the only ones that depend on the caption's colour, otherwise hardly move the loss.
    object_token_weight: float = 1.0
    # Weight of an auxiliary loss: the hidden state at every image position predicts, through the
    # text head, the words of its caption (training only; inference never runs it). With patch-local
    # tokens only an object's first token needs the caption (the rest copy their neighbours), and the
    # LM never learns to read colour and shape words for drawing; this loss makes them dense.
    caption_recall_weight: float = 0.0
    # Start the LM's image-token input embeddings at the trained VQ codes (fresh models only), so
    # codes that look alike start alike instead of at unrelated random vectors.
    image_embeddings_from_codebook: bool = False
    # Weight of the vision stage's patch-label loss on the understanding images of every LM step
    # (shapes world only): the vision tower keeps a dense signal while answers train it too.
    patch_label_weight: float = 0.0
    # Weight of an auxiliary loss on where the LM looks (shapes world only; training only): at every
    # answer to a question about one object ("where is the red circle?", "what colour is the shape on
    # the left?"), one attention head is taught to put its weight on that object's image tokens. The
    # LM otherwise learns to find an object by position but not by a named colour or shape, and
    # answers about the other object of a pair.
    binding_attention_weight: float = 0.0
    binding_attention_layer: int | None = None  # None: the middle layer
    binding_attention_head: int = 0
    # Weight of a second such loss (shapes world only; training only): at the same answer positions,
    # the input of that layer predicts, through a training-only linear head, the colour, shape and
    # position the question names - what the head's query needs to look the object up. Without it
    # the named colour is hardly readable there (a linear probe: ~57%), and the lookup fails.
    question_label_weight: float = 0.0
    grad_clip: float = 1.0


@dataclass
class Recipe:
    """Everything a training run depends on; with the seed it determines the result."""

    seed: int = 0
    # torch CPU threads (0: torch's default); more than the CPUs this process may use are lowered to
    # that count with a warning (a resumed run may land on a smaller machine, and its recipe is fixed)
    threads: int = 0
    # fine-tune this checkpoint (its sizes, tokenizer and VQ-VAE) instead of a fresh model; a run stores
    # it (and the data files) as absolute paths, resolved against the directory it started in
    init_from: str | None = None
    model: ModelSizes = field(default_factory=ModelSizes)
    data: DataSpec = field(default_factory=DataSpec)
    vq: VQStage = field(default_factory=VQStage)
    vision: VisionStage = field(default_factory=VisionStage)
    lm: LMStage = field(default_factory=LMStage)
    checkpoint_every: int = 100
    export_dtype: str = "float32"
    # The guidance scale ``vlmkit imagine`` uses by default, written to generation_config.json (None:
    # DeepSeek's 5, or the ``init_from`` checkpoint's). CFG extrapolates logits, which lifts every
    # token the unconditional branch deems unlikely: a model whose token choices are near-certain
    # draws noise at 5 and needs a gentle scale.
    guidance_scale: float | None = None

    def __post_init__(self):
        if self.vq.steps is None:  # see VQStage.steps
            self.vq = replace(self.vq, steps=0 if self.init_from else VQ_STEPS_FRESH)

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        """The recipe a JSON object describes, its types and values checked (``check``)."""
        nested = {"model": ModelSizes, "data": DataSpec, "vq": VQStage, "vision": VisionStage, "lm": LMStage}
        recipe = _build(cls, values, nested, "recipe")
        recipe.check()
        return recipe

    @classmethod
    def from_file(cls, path) -> "Recipe":
        """The recipe in a JSON file (``from_dict``), with an error naming the file when it cannot be read."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"recipe {path} does not exist") from None
        except IsADirectoryError:
            raise InputError(f"recipe {path} is a folder; give the recipe's JSON file") from None
        except UnicodeDecodeError as err:
            raise InputError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON") from None
        except OSError as err:
            raise InputError(f"cannot read recipe {path}: {err.strerror or err}") from None
        return cls.from_dict(parse_json(text, f"recipe {path} is"))

    def check(self) -> None:
        """Refuse values no run can use (a zero batch, a negative learning rate, NaN, a VQ grid that does
        not match the patch grid...) with an error naming the key, before anything is written or trained:
        otherwise they surface as a traceback minutes in, or train a model of NaNs without a word."""
        for section, values in (("recipe", self), ("recipe.model", self.model), ("recipe.data", self.data),
                                ("recipe.vq", self.vq), ("recipe.vision", self.vision), ("recipe.lm", self.lm)):
            for item in fields(values):
                _check_value(f"{section}.{item.name}", getattr(values, item.name))
        if self.export_dtype not in DTYPE_NAMES:
            raise InputError(f"recipe.export_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.export_dtype!r}")
        if self.data.source not in ("shapes", "jsonl"):
            raise InputError(f"recipe.data.source must be 'shapes' or 'jsonl', got {self.data.source!r}")
        for name, value in (("init_from", self.init_from), ("data.understanding", self.data.understanding),
                            ("data.generation", self.data.generation)):
            if value is not None and not value.strip():
                raise InputError(f"recipe.{name} is an empty path; give a path, or null (or leave the key out) "
                                 f"for none")
        if self.data.source == "jsonl" and not (self.data.understanding or self.data.generation):
            raise InputError("recipe.data.source 'jsonl' needs data.understanding and/or data.generation: the JSONL "
                             "files to train on")
        if self.lm.steps and not (self.lm.understanding_batch or self.lm.generation_batch):
            raise InputError("recipe.lm.understanding_batch and lm.generation_batch are both 0: an LM step needs "
                             "examples (or set lm.steps to 0)")
        _check_keys_apply(self)
        if not self.init_from:  # a fine-tuned model keeps its checkpoint's sizes
            _check_sizes(self.model)
            factor = 2 ** (len(self.model.vq_channel_multiplier) - 1)
            if self.vq.crop_size and (self.vq.crop_size % factor or self.vq.crop_size > self.model.image_size):
                raise InputError(f"recipe.vq.crop_size must be a multiple of {factor} (the VQ's downsampling) and at "
                                 f"most model.image_size ({self.model.image_size}), got {self.vq.crop_size}")

    def to_dict(self) -> dict:
        return asdict(self)


# What each numeric recipe key may hold, by name (a name means the same in every section): at least 0,
# at least 1, above 0, or a share from 0 to 1. Every number must also be finite (JSON readers take NaN).
_AT_LEAST_ONE = {"checkpoint_every", "batch_size", "questions_per_image"}
_ABOVE_ZERO = {"lr"}
_SHARES = {"two_object_share", "min_lr_ratio", "caption_dropout"}


def _check_value(name: str, value) -> None:
    key = name.rsplit(".", 1)[1]
    if isinstance(value, list):
        for item in value:
            _check_value(name, item)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if key == "seed":
        low, high = SEED_RANGE
        if not low <= value <= high:
            raise InputError(f"{name} must be a whole number from {low} to {high}, got {value}")
    elif key == "guidance_scale":
        if not 0 <= value <= MAX_GUIDANCE_SCALE:
            raise InputError(f"{name} must be from 0 to {MAX_GUIDANCE_SCALE:g} (null: the default), got {value}")
    elif key in _SHARES:
        if not 0 <= value <= 1:
            raise InputError(f"{name} must be from 0 to 1, got {value}")
    elif key in _ABOVE_ZERO:
        if value <= 0:
            raise InputError(f"{name} must be above 0, got {value}")
    elif key in _AT_LEAST_ONE or name.startswith("recipe.model."):
        if value < 1:
            raise InputError(f"{name} must be 1 or more, got {value}")
    elif value < 0:
        raise InputError(f"{name} must be 0 or more, got {value}")


def _changed(values, defaults, section: str) -> list[str]:
    """The keys of ``values`` (a recipe section) that differ from the section's defaults."""
    return [f"{section}.{item.name}" for item in fields(values)
            if getattr(values, item.name) != getattr(defaults, item.name)]


def _check_keys_apply(recipe: "Recipe") -> None:
    """Refuse keys the run would ignore (a typo in a recipe should not silently train something else): a
    key that cannot apply may hold its default only."""
    if recipe.init_from:
        changed = _changed(recipe.model, ModelSizes(), "model")
        if changed:
            raise InputError(f"recipe.{', '.join(changed)} cannot apply with init_from: a fine-tune keeps the "
                             f"checkpoint's sizes; leave the model section out")
        if recipe.lm.image_embeddings_from_codebook:
            raise InputError("recipe.lm.image_embeddings_from_codebook cannot apply with init_from: it starts a "
                             "fresh model's image embeddings, and a fine-tune keeps the checkpoint's; set it to false")
    data = recipe.data
    if data.source == "jsonl":
        shapes_only = [key for key in _changed(data, DataSpec(), "data")
                       if key not in ("data.source", "data.understanding", "data.generation")]
        if shapes_only:
            raise InputError(f"recipe.{', '.join(shapes_only)} cannot apply with data.source 'jsonl': "
                             f"{'it draws' if len(shapes_only) == 1 else 'they draw'} the shapes world's scenes; "
                             f"leave {'it' if len(shapes_only) == 1 else 'them'} out")
        for name, file, batch in (("understanding", data.understanding, recipe.lm.understanding_batch),
                                  ("generation", data.generation, recipe.lm.generation_batch)):
            # the VQ stage draws its images from both files, so a file is unused only without it
            if file and not batch and not recipe.vq.steps:
                raise InputError(f"recipe.data.{name} names a file that no step reads: lm.{name}_batch is 0 (and "
                                 f"vq.steps 0); set lm.{name}_batch above 0, or leave data.{name} out")
    else:
        files = [f"data.{name}" for name in ("understanding", "generation") if getattr(data, name)]
        if files:
            raise InputError(f"recipe.{' and '.join(files)} cannot apply with data.source {data.source!r}: set "
                             f"data.source to 'jsonl' to train on the files, or leave them out")


def _check_sizes(sizes: ModelSizes) -> None:
    """The shapes a fresh model's modules need, checked before a tokenizer is trained or a file written."""
    divisible = (("hidden_size", "num_heads"), ("num_heads", "num_kv_heads"), ("vision_hidden_size", "vision_heads"),
                 ("image_size", "patch_size"))
    for whole, part in divisible:
        if getattr(sizes, whole) % getattr(sizes, part):
            raise InputError(f"recipe.model.{whole} ({getattr(sizes, whole)}) must be a multiple of "
                             f"model.{part} ({getattr(sizes, part)})")
    head = sizes.hidden_size // sizes.num_heads
    if head % 2:  # rotary embeddings turn each head's channels in pairs
        raise InputError(f"recipe.model.hidden_size / num_heads ({sizes.hidden_size} / {sizes.num_heads} = {head}) "
                         f"must be even: rotary position embeddings need an even head size; e.g. hidden_size "
                         f"{sizes.num_heads * (head + 1)}")
    image_tokens = (sizes.image_size // sizes.patch_size) ** 2
    if sizes.max_position_embeddings <= image_tokens + 2:
        raise InputError(f"recipe.model.max_position_embeddings ({sizes.max_position_embeddings}) leaves no room for "
                         f"a prompt: an image is {image_tokens} tokens plus its 2 markers; give more than that plus "
                         f"the longest prompt and answer (the default is 1024)")
    if not sizes.vq_channel_multiplier:
        raise InputError("recipe.model.vq_channel_multiplier is empty; give one multiplier per VQ level, e.g. "
                         "[1, 1, 2, 2]")
    side = sizes.image_size // sizes.patch_size
    latent_side = sizes.image_size / 2 ** (len(sizes.vq_channel_multiplier) - 1)
    if latent_side != side:
        raise InputError(f"recipe.model: the VQ grid ({sizes.image_size} / 2^{len(sizes.vq_channel_multiplier) - 1} "
                         f"= {latent_side:g} a side, from {len(sizes.vq_channel_multiplier)} vq_channel_multiplier "
                         f"levels) must match the vision patch grid ({side} a side): Janus uses one grid for both")


def _build(cls, values: dict, nested: dict, where: str):
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in nested:
            kwargs[key] = _build(nested[key], value, {}, f"{where}.{key}")
        elif not _is_a(value, hints[key]):
            raise InputError(f"{where}.{key} must be {_describe(hints[key])}, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _is_a(value, hint) -> bool:
    """Whether a JSON value fits a field's type (ints count as floats; booleans are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_is_a(item, args[0]) for item in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    return _NAMES.get(hint, hint.__name__)
