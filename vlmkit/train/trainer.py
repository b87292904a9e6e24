"""The training run: prepare the output folder (tokenizer, processor files, config), train the VQ-VAE,
optionally pre-train the vision tower, then the joint LM, checkpointing as it goes, and export in the
transformers layout.

Output folder: the checkpoint files themselves (loadable by vlmkit and transformers once training has
finished) and ``training/`` with the recipe, ``checkpoint.pt`` (the latest resumable state) and
``log.jsonl``. A step's batch depends only on (seed, stage, step), so resuming from a checkpoint
reproduces the uninterrupted run exactly."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..io.checkpoint import read_json
from ..models.devices import resolve_device
from .checkpoint import Diverged, export_weights, save_training_state
from .data import jsonl_source
from .init import janus_config_dict, new_model
from .batches import check_row_lengths
from .preflight import (CHECKPOINT_FILES, check_init_from, check_new_run_folder, load_state, resumed_recipe,
                        usable_threads, with_absolute_paths)
from .recipe import Recipe
from .stages import (ImageTokenCache, image_embeddings_from_codebook, lm_losses, lr_at, random_crops,
                     restart_dead_codes, vq_losses)
from .tokenizer import token_ids, train_tokenizer, write_processor_files



class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, periodic checkpoints still hold
                pass
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint; ``--resume`` continues it."""


def _json_number(value):
    """A value for log.jsonl: NaN and infinity are not JSON, so they are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _prepare_folder(recipe: Recipe, out: Path) -> None:
    _write_checkpoint_files(recipe, out)
    if recipe.guidance_scale is not None:
        generation = read_json(out / "generation_config.json")
        generation["guidance_scale"] = recipe.guidance_scale
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def _write_checkpoint_files(recipe: Recipe, out: Path) -> None:
    if recipe.init_from:
        from ..io.checkpoint import resolve_model_path
        source = resolve_model_path(recipe.init_from)
        for name in CHECKPOINT_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return
    from ..builtin.shapes import text_corpus  # a fresh model's vocabulary: the shapes world's words
    sizes = recipe.model
    tokenizer = train_tokenizer(text_corpus(seed=recipe.seed), sizes.vocab_size)
    num_image_tokens = (sizes.image_size // sizes.patch_size) ** 2
    write_processor_files(out, tokenizer, sizes.image_size, num_image_tokens)
    vocab_size = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 64) * 64
    config = janus_config_dict(sizes, token_ids(tokenizer), vocab_size, recipe.vq.patchwise)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _check_lengths(folder: Path, jsonl):
    """Refuse JSONL lines whose rows do not fit the context of the model in ``folder`` (its config and
    processor files: no weights are read); returns the processor it loaded (None without JSONL data)."""
    if jsonl is None:
        return None
    from ..models.janus.config import JanusConfig
    from ..models.janus.processing import JanusProcessor
    config = JanusConfig.from_dict(read_json(folder / "config.json"))
    processor = JanusProcessor.from_pretrained(folder)
    check_row_lengths(processor, jsonl, config.vision_config.num_image_tokens, config.text_config.context_length)
    return processor


def _build_model(recipe: Recipe, out: Path):
    if recipe.init_from:
        from ..models.janus.modeling import JanusForConditionalGeneration
        model = JanusForConditionalGeneration.from_pretrained(out if (out / "model.safetensors").is_file()
                                                              else recipe.init_from, dtype=torch.float32,
                                                              device="cpu")
        if not getattr(model, "has_generation_weights", True):
            raise InputError(f"{recipe.init_from} has no image-generation weights; fine-tuning needs a full Janus")
        return model.train()
    return new_model(read_json(out / "config.json"), recipe.seed).train()


def _with_current_names(state: dict) -> dict:
    """A saved model state with vlmkit's current module names: training states written before the vision
    tower's attention output took transformers' name (``projection_layer``) call it ``out_proj``."""
    older = re.compile(r"^(model\.vision_model\.encoder\.layers\.\d+\.self_attn)\.out_proj\.")
    return {older.sub(r"\1.projection_layer.", name): tensor for name, tensor in state.items()}


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _jsonl_data(recipe: Recipe):
    """The JSONL source of a recipe whose data names files (every line and image checked), or None for the
    shapes world; read before anything is written or loaded, so a bad line stops the run at once. The
    vision stage and the LM's label and binding losses need the shapes world's scenes."""
    if recipe.data.source == "shapes":
        return None
    shapes_only = (
        (recipe.vision.steps or recipe.lm.patch_label_weight, "the vision stage and lm.patch_label_weight",
         "label every patch from the scene", "vision.steps and lm.patch_label_weight"),
        (recipe.lm.binding_attention_weight or recipe.lm.question_label_weight,
         "lm.binding_attention_weight and lm.question_label_weight", "know which object each question asks about",
         "them"),
    )
    for asked, what, why, settings in shapes_only:
        if asked:
            raise InputError(f"{what} need data.source 'shapes' (they {why}); set {settings} to 0 for other data")
    return jsonl_source(recipe.data)


def _data(recipe: Recipe, model, device, jsonl):
    """(the example source, the shapes world's part of the run or None): ``jsonl`` (``_jsonl_data``) where
    the recipe names files, else the shapes world, which draws its scenes with the model's sizes."""
    if jsonl is not None:
        return jsonl, None
    from ..builtin.training import ShapesTraining
    shapes = ShapesTraining(recipe, model, device)
    return shapes.source, shapes


class Trainer:
    """One run of a recipe into ``out``; ``run()`` trains what is left and exports."""

    def __init__(self, recipe: Recipe | None, out, resume: bool = False, progress: bool = True,
                 halt_after: int | None = None, device=None, time_limit: float | None = None):
        self.out = Path(out)
        # Where to train is not part of the recipe: the same recipe on another device trains the same
        # model up to floating-point rounding (batches are drawn on the CPU either way).
        self.device = resolve_device(device=device)
        self.work = self.out / "training"
        self.checkpoint_path = self.work / "checkpoint.pt"
        self.progress = progress
        self.halt_after = halt_after  # stop (as if killed right after a checkpoint) after this many steps
        # stop the same way once ``run()`` has trained for this many seconds (a run's step count is part
        # of its recipe; how long one sitting may take is not)
        self.time_limit = time_limit
        self.started = None
        self.steps_done = 0
        self.state = {"stage": "vq", "step": 0, "elapsed": {}}
        saved, processor = None, None
        if resume:
            recipe = resumed_recipe(self.out, self.work / "recipe.json", self.checkpoint_path, recipe)
            jsonl = _jsonl_data(recipe)
            processor = _check_lengths(self.out, jsonl)  # the run's own: kept, not loaded again below
            saved = load_state(self.checkpoint_path)
        else:  # (checked in a scratch folder before --out exists: the run's processor is loaded below)
            recipe, jsonl = self._start(recipe)
        self.recipe = recipe
        if recipe.threads:
            torch.set_num_threads(usable_threads(recipe.threads))
        from ..models.janus.processing import JanusProcessor
        self.processor = processor or JanusProcessor.from_pretrained(self.out)
        self.model = _build_model(recipe, self.out).to(self.device)
        self.vq_usage = torch.zeros(self.model.config.vq_config.num_embeddings, dtype=torch.long)
        self.optimizer_state = None
        # the shapes world's stages and losses (builtin.training) plug in when it is the data
        self.source, self.shapes = _data(recipe, self.model, self.device, jsonl)
        self.heads = self.shapes.heads if self.shapes is not None else {}
        if saved is not None:
            self.model.load_state_dict(_with_current_names(saved["model"]))
            self.state = saved["state"]
            self.optimizer_state = saved["optimizer"]
            self.vq_usage = saved["vq_usage"]
            for name, head in self.heads.items():
                if head is not None and saved.get(name):
                    try:
                        head.load_state_dict(saved[name])
                    except RuntimeError:  # a checkpoint from a vlmkit whose labels had other classes
                        raise InputError(f"the training checkpoint's {name} does not fit this vlmkit's labels "
                                         f"({self.checkpoint_path}); start the stage again or use the vlmkit "
                                         "that wrote it") from None
        self.vq_usage = self.vq_usage.to(self.device)

    def _start(self, recipe: Recipe | None):
        """A new run's checks, then its folder: the checkpoint files are prepared in a scratch folder first
        (a fresh model's tokenizer is trained there), so lines too long for the model's context are refused
        before ``--out`` is created."""
        if recipe is None:
            raise InputError("a new training run needs a recipe (--config recipe.json)")
        recipe.check()  # a Recipe built in Python has not been through from_dict's checks
        if recipe.init_from:
            check_init_from(recipe.init_from)
        recipe = with_absolute_paths(recipe)
        jsonl = _jsonl_data(recipe)
        with tempfile.TemporaryDirectory(prefix="vlmkit-train-") as scratch:
            scratch = Path(scratch)
            _prepare_folder(recipe, scratch)
            _check_lengths(scratch, jsonl)
            check_new_run_folder(self.out)  # last: it creates the folder
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
            for item in scratch.iterdir():
                shutil.copyfile(item, self.out / item.name)
        return recipe, jsonl

    # --- bookkeeping ---------------------------------------------------------------------------
    def save(self, optimizer) -> None:
        save_training_state(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "state": self.state, "vq_usage": self.vq_usage.cpu(),
            **{name: self.heads[name].state_dict() if self.heads.get(name) is not None else None
               for name in ("vision_head", "question_head")}})

    def _log(self, values: dict) -> None:
        with open(self.work / "log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({k: _json_number(v) for k, v in values.items()}, allow_nan=False) + "\n")

    def _sitting_is_over(self) -> bool:
        """This invocation's step or time allowance is used up."""
        if self.halt_after is not None and self.steps_done >= self.halt_after:
            return True
        return self.time_limit is not None and time.perf_counter() - self.started >= self.time_limit

    def _step_rng(self, stage: str, step: int):
        import random
        return random.Random(f"{self.recipe.seed}:{stage}:{step}")

    def _loop(self, stage: str, total: int, optimizer, step_fn, peak_lr: float, warmup: int, min_ratio: float,
              stop: _StopRequest) -> None:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=self.state["step"], desc=stage, dynamic_ncols=True, disable=not self.progress)
        started = time.perf_counter() - self.state["elapsed"].get(stage, 0.0)
        while self.state["step"] < total:
            step = self.state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, peak_lr, warmup, min_ratio)
            losses = step_fn(step, self._step_rng(stage, step))
            self.state["step"] = step + 1
            self.state["elapsed"][stage] = time.perf_counter() - started
            self.steps_done += 1
            values = {k: round(float(v.detach() if torch.is_tensor(v) else v), 5) for k, v in losses.items()}
            if not math.isfinite(values["loss"]):
                self._log({"stage": stage, "step": step, "lr": optimizer.param_groups[0]["lr"], **values})
                bar.close()
                raise Diverged(f"the {stage} loss is {values['loss']} at {stage} step {step + 1} of {total} (learning "
                               f"rate {optimizer.param_groups[0]['lr']:g}): the run diverged, and nothing was "
                               f"exported. Lower {stage}.lr (now {peak_lr:g}) or lengthen {stage}.warmup, and start "
                               f"again in a new --out folder")
            bar.update(1)
            bar.set_postfix(values, refresh=False)
            if step % 10 == 0 or step + 1 == total:
                self._log({"stage": stage, "step": step, "lr": optimizer.param_groups[0]["lr"], **values,
                           "elapsed": round(self.state["elapsed"][stage], 1)})
            halting = self._sitting_is_over()
            if (step + 1) % self.recipe.checkpoint_every == 0 or stop.requested or halting:
                self.save(optimizer)
            if stop.requested or halting:
                bar.close()
                raise Interrupted(f"stopped after {stage} step {step + 1}; checkpoint in {self.checkpoint_path}")
        bar.close()

    # --- stages --------------------------------------------------------------------------------
    def _vq_stage(self, stop: _StopRequest) -> None:
        stage, vq = self.recipe.vq, self.model.model.vqmodel
        optimizer = _optimizer(vq.parameters(), stage.lr, 0.0)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        image_processor = self.processor.image_processor

        factor = self.model.config.vq_config.downsampling_factor

        def step_fn(step, rng):
            pixels = image_processor([self.source.image(rng) for _ in range(stage.batch_size)])["pixel_values"]
            pixels = pixels.to(self.device)
            if stage.crop_size and step < stage.steps - stage.full_image_steps:
                pixels = random_crops(pixels, stage.crop_size, factor, rng)
            losses, codes = vq_losses(vq, pixels, stage.commitment, stage.foreground_weight)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            self.vq_usage += torch.bincount(codes, minlength=len(self.vq_usage))
            if stage.restart_dead_codes_every and (step + 1) % stage.restart_dead_codes_every == 0 \
                    and step + 1 < stage.steps * 0.8:
                generator = torch.Generator().manual_seed(rng.getrandbits(62))
                losses["restarted"] = restart_dead_codes(
                    vq, self.vq_usage, pixels, generator, stage.restart_worst_served)
                self.vq_usage.zero_()
            return losses

        self._loop("vq", stage.steps, optimizer, step_fn, stage.lr, stage.warmup, 0.1, stop)

    def _vision_stage(self, stop: _StopRequest) -> None:
        stage, vision = self.recipe.vision, self.model.model.vision_model
        optimizer = _optimizer(list(vision.parameters()) + list(self.heads["vision_head"].parameters()), stage.lr, 0.0)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        image_processor = self.processor.image_processor

        def step_fn(step, rng):
            losses = self.shapes.vision_losses(image_processor, rng, stage.batch_size)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            return losses

        self._loop("vision", stage.steps, optimizer, step_fn, stage.lr, stage.warmup, 0.1, stop)

    def _lm_stage(self, stop: _StopRequest) -> None:
        stage, vq = self.recipe.lm, self.model.model.vqmodel
        vq.requires_grad_(False)
        vq.eval()
        params = [p for n, p in self.model.named_parameters() if not n.startswith("model.vqmodel.")]
        if self.shapes is not None:
            params += self.shapes.lm_parameters()
        optimizer = _optimizer(params, stage.lr, stage.weight_decay)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        if stage.image_embeddings_from_codebook and not self.recipe.init_from and self.state["step"] == 0:
            image_embeddings_from_codebook(self.model)  # frozen codes: a resume at step 0 redoes the same
        image_tokens = ImageTokenCache(vq)

        def step_fn(step, rng):
            easy = step < self.recipe.data.curriculum_steps
            losses = lm_losses(self.model, self.processor, self.source, rng, stage, easy, self.device, image_tokens,
                               self.shapes)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            return losses

        self._loop("lm", stage.steps, optimizer, step_fn, stage.lr, stage.warmup, stage.min_lr_ratio, stop)

    def run(self) -> Path:
        """Train what is left of the recipe, export, and return the output folder."""
        self.started = time.perf_counter()
        stages = (("vq", self._vq_stage), ("vision", self._vision_stage if self.recipe.vision.steps else None),
                  ("lm", self._lm_stage))
        names = [name for name, _ in stages] + ["done"]
        with _StopRequest() as stop:
            for name, run_stage in stages:
                if self.state["stage"] != name:
                    continue
                if run_stage is not None:
                    run_stage(stop)
                # a checkpoint at each stage change: a resume starts the next stage with a fresh optimizer
                self.state.update(stage=names[names.index(name) + 1], step=0)
                self.optimizer_state = None
                self.save(None)
        export_weights(self.model, self.out, self.recipe.export_dtype)
        return self.out


def train(recipe: Recipe | None, out, resume: bool = False, progress: bool = True,
          halt_after: int | None = None, device=None, time_limit: float | None = None) -> Path:
    """Run (or, with ``resume``, continue) a recipe into ``out`` on ``device`` (default: the CPU; a run
    may resume on another device); see ``Trainer``. The recipe's thread count holds for the run only."""
    threads = torch.get_num_threads()
    try:
        return Trainer(recipe, out, resume=resume, progress=progress, halt_after=halt_after, device=device,
                       time_limit=time_limit).run()
    finally:
        torch.set_num_threads(threads)
