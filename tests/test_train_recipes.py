"""`vlmkit train` refuses what it cannot train as asked, before --out is created: recipe keys that cannot
apply, JSONL lines no tokenizer takes or longer than the model's context; a diverging run stops without
exporting NaN weights; a run stores absolute paths, so it resumes from any directory; a fine-tune keeps
its checkpoint's VQ-VAE unless asked."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.errors import InputError
from vlmkit.train import Diverged, Interrupted, Recipe, train
from vlmkit.train.batches import RowLengths, understanding_row
from vlmkit.train.checkpoint import export_weights
from vlmkit.train.data import UnderstandingExample
from vlmkit.train.preflight import usable_threads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QA = {"image": "0.png", "conversation": [{"role": "user", "content": "what is it?"},
                                         {"role": "assistant", "content": "a square"}]}
CAPTION = {"image": "0.png", "caption": "a square"}


def write_data(folder, understanding=(QA,), generation=(CAPTION,)):
    """u.jsonl and g.jsonl of these lines (dicts, or raw text) beside one 32-px picture."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "0.png")
    for name, lines in (("u.jsonl", understanding), ("g.jsonl", generation)):
        (folder / name).write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                           for line in lines), encoding="utf-8")
    return folder / "u.jsonl", folder / "g.jsonl"


def fine_tune(janus_dir, data_folder, **changes) -> dict:
    """A 2-step fine-tune recipe of the tiny Janus on ``data_folder``'s files; ``changes``: "lm.lr"-style keys."""
    values = {"init_from": str(janus_dir), "threads": 1,
              "data": {"source": "jsonl", "understanding": str(data_folder / "u.jsonl"),
                       "generation": str(data_folder / "g.jsonl")},
              "lm": {"steps": 2, "understanding_batch": 1, "generation_batch": 1, "warmup": 1}}
    for key, value in changes.items():
        section = values
        *parents, last = key.split(".")
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = value
    return values


# --- keys that cannot apply -------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"init_from": ""}, r"recipe.init_from is an empty path; give a path, or null"),
    ({"data.understanding": ""}, r"recipe.data.understanding is an empty path"),
    ({"model": {"hidden_size": 999}}, r"recipe.model.hidden_size cannot apply with init_from: a fine-tune keeps "
                                      r"the checkpoint's sizes"),
    ({"lm.image_embeddings_from_codebook": True}, r"recipe.lm.image_embeddings_from_codebook cannot apply with "
                                                  r"init_from"),
    ({"data.curriculum_steps": 5}, r"recipe.data.curriculum_steps cannot apply with data.source 'jsonl'"),
    ({"data.questions_per_image": 3, "data.canonical_generation": True},
     r"recipe.data.questions_per_image, data.canonical_generation cannot apply with data.source 'jsonl'"),
    ({"lm.understanding_batch": 0}, r"recipe.data.understanding names a file that no step reads: "
                                    r"lm.understanding_batch is 0"),
    ({"lm.generation_batch": 0}, r"recipe.data.generation names a file that no step reads"),
    ({"data.source": "shapes"}, r"recipe.data.understanding and data.generation cannot apply with data.source "
                                r"'shapes'"),
])
def test_recipe_keys_that_cannot_apply_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        Recipe.from_dict(fine_tune(tmp_path / "ckpt", tmp_path, **changes))


def test_keys_at_their_neutral_default_are_accepted(tmp_path):
    recipe = Recipe.from_dict(fine_tune(tmp_path / "ckpt", tmp_path, **{"model": {"hidden_size": 256},
                                                                        "data.curriculum_steps": 0}))
    assert recipe.model.hidden_size == 256
    # a file read by the VQ stage only is used, so it is not refused
    Recipe.from_dict(fine_tune(tmp_path / "ckpt", tmp_path, **{"lm.understanding_batch": 0, "vq.steps": 2}))


def test_an_empty_init_from_stops_the_command_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(fine_tune(tmp_path / "ckpt", tmp_path, init_from="")))
    assert main(["train", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "recipe.init_from is an empty path" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_more_threads_than_cpus_are_lowered_with_a_warning():
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with pytest.warns(UserWarning, match=f"recipe.threads is 10000 but this process may use {available} CPUs"):
        assert usable_threads(10_000) == available
    assert usable_threads(1) == 1


# --- a fine-tune keeps the checkpoint's VQ-VAE --------------------------------------------------------

def test_a_fine_tune_trains_no_vq_steps_unless_asked_and_a_fresh_model_does(tmp_path):
    assert Recipe.from_dict(fine_tune(tmp_path / "ckpt", tmp_path)).vq.steps == 0
    assert Recipe.from_dict(fine_tune(tmp_path / "ckpt", tmp_path, **{"vq.steps": 3})).vq.steps == 3
    assert Recipe.from_dict({}).vq.steps == 1000
    assert Recipe(init_from="ckpt").vq.steps == 0


def test_a_fine_tune_leaves_the_vq_weights_as_they_were(janus_dir, tmp_path):
    write_data(tmp_path / "data")
    out = train(Recipe.from_dict(fine_tune(janus_dir, tmp_path / "data", **{"lm.steps": 1})), tmp_path / "run",
                progress=False)
    tuned, original = load_file(str(out / "model.safetensors")), load_file(str(janus_dir / "model.safetensors"))
    vq = [name for name in original if "vqmodel" in name]
    assert vq and all(torch.equal(tuned[name], original[name]) for name in vq)


# --- JSONL lines --------------------------------------------------------------------------------------

def test_a_line_with_a_lone_surrogate_is_refused_by_file_and_line_before_anything_is_written(janus_dir, tmp_path):
    bad = '{"image": "0.png", "conversation": [{"role": "user", "content": "q?"}, ' \
          '{"role": "assistant", "content": "a\\ud800b"}]}'
    write_data(tmp_path / "data", understanding=(QA, bad))
    with pytest.raises(InputError, match=r"u.jsonl:2 holds a lone surrogate \\ud800"):
        train(Recipe.from_dict(fine_tune(janus_dir, tmp_path / "data")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("understanding, generation, where", [
    ((QA, {**QA, "conversation": [{"role": "user", "content": "word " * 600},
                                  {"role": "assistant", "content": "y"}]}), (CAPTION,), "u.jsonl:2"),
    ((QA,), (CAPTION, CAPTION, {"image": "0.png", "caption": "long " * 600}), "g.jsonl:3"),
])
def test_a_line_longer_than_the_models_context_is_refused_before_anything_is_written(janus_dir, tmp_path,
                                                                                     understanding, generation, where):
    write_data(tmp_path / "data", understanding, generation)
    with pytest.raises(InputError, match=where + r": its training row is \d{3,} tokens long, longer than the model's "
                                                 r"context of 512 tokens"):
        train(Recipe.from_dict(fine_tune(janus_dir, tmp_path / "data")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_row_lengths_counted_without_images_are_the_training_rows_lengths(janus_dir):
    from vlmkit.models.janus.processing import JanusProcessor
    processor = JanusProcessor.from_pretrained(janus_dir)
    lengths = RowLengths(processor, processor.num_image_tokens)
    image = Image.new("RGB", (32, 32))
    for messages in ([{"role": "user", "content": "what colour?"}, {"role": "assistant", "content": "red"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
                      {"role": "user", "content": "and the shape, précisément?"},
                      {"role": "assistant", "content": "a star ★"}]):
        ids, _, _ = understanding_row(processor, UnderstandingExample(image, messages))
        assert lengths.understanding(messages) == len(ids)


# --- a diverging run ----------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_an_error_and_exports_nothing(janus_dir, tmp_path, capsys):
    write_data(tmp_path / "data")
    (tmp_path / "r.json").write_text(json.dumps(fine_tune(janus_dir, tmp_path / "data", **{"lm.lr": 1e6,
                                                                                            "lm.steps": 4})))
    assert main(["train", "--quiet", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the lm loss is nan at lm step" in err and "Lower lm.lr (now 1e+06)" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()

    def no_bare_constants(name):
        raise ValueError(f"{name} in log.jsonl")
    rows = [json.loads(line, parse_constant=no_bare_constants)
            for line in (tmp_path / "out" / "training" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] is None


def test_weights_that_are_not_finite_are_never_exported(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = 1e6  # finite in float32, infinite in float16
    export_weights(model, tmp_path, "float32")
    with pytest.raises(Diverged, match="hold NaN or infinity in float16 .*weight"):
        export_weights(model, tmp_path / "half", "float16")
    assert not (tmp_path / "half" / "model.safetensors").exists()


# --- paths --------------------------------------------------------------------------------------------

def test_relative_paths_are_stored_absolute_and_resume_from_any_directory(janus_dir, tmp_path, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    write_data(start / "data")
    write_data(elsewhere / "data", understanding=({**QA, "conversation": [QA["conversation"][0],
                                                                          {"role": "assistant", "content": "other"}]},))
    monkeypatch.chdir(start)
    recipe = fine_tune(janus_dir, start / "data", **{"data.understanding": "data/u.jsonl",
                                                     "data.generation": "data/g.jsonl", "lm.steps": 3})
    with pytest.raises(Interrupted):
        train(Recipe.from_dict(recipe), tmp_path / "run", progress=False, halt_after=1)
    saved = json.loads((tmp_path / "run" / "training" / "recipe.json").read_text())
    assert saved["data"]["understanding"] == str(start / "data" / "u.jsonl")
    assert saved["init_from"] == str(janus_dir.resolve())
    monkeypatch.chdir(elsewhere)  # holds its own data/u.jsonl: the run must not read it
    train(None, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_an_older_recipe_with_relative_paths_resumes_from_where_they_are(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "training").mkdir(parents=True)
    (out / "training" / "checkpoint.pt").write_bytes(b"")
    older = fine_tune("/abs/ckpt", tmp_path, **{"data.understanding": "data/u.jsonl"})  # as vlmkit stored it before
    (out / "training" / "recipe.json").write_text(json.dumps(older))
    monkeypatch.chdir(tmp_path / "run")  # no data/u.jsonl here
    with pytest.raises(InputError, match=r"names data.understanding 'data/u.jsonl' relative to the directory the run "
                                         r"started in.*edit it to the absolute path"):
        train(None, out, resume=True, progress=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "u.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)  # where the older run started
    from vlmkit.train.preflight import resumed_recipe
    with pytest.warns(UserWarning, match="relative to the directory the run started in; reading"):
        recipe = resumed_recipe(out, out / "training" / "recipe.json", out / "training" / "checkpoint.pt", None)
    assert recipe.data.understanding == str(tmp_path / "data" / "u.jsonl")


@pytest.mark.parametrize("model, message", [
    ({"hidden_size": 66, "num_heads": 2, "num_kv_heads": 2}, r"recipe.model.hidden_size / num_heads \(66 / 2 = 33\) must be even"),
    ({"max_position_embeddings": 8}, r"recipe.model.max_position_embeddings \(8\) leaves no room for a prompt: an "
                                     r"image is 64 tokens"),
])
def test_sizes_no_model_can_run_are_refused_by_the_recipe_check(tmp_path, capsys, model, message):
    with pytest.raises(InputError, match=message):
        Recipe.from_dict({"model": model})
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": model, "vq": {"steps": 1}}))
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")]) != 0
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ('{"lm": {"seed": ' + "9" * 5000 + "}}", "JSON with a number of more than 4300 digits"),
])
def test_a_recipe_or_data_line_beyond_pythons_json_limits_is_one_error_naming_the_file(janus_dir, tmp_path, text,
                                                                                          message):
    (tmp_path / "recipe.json").write_text(text)
    with pytest.raises(InputError, match=f"recipe {tmp_path / 'recipe.json'} is {message}"):
        Recipe.from_file(tmp_path / "recipe.json")
    write_data(tmp_path / "data", understanding=(QA, text))
    with pytest.raises(InputError, match=f"u.jsonl:2 is {message}"):
        train(Recipe.from_dict(fine_tune(janus_dir, tmp_path / "data")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
