"""vlmkit's training path on a tiny model: both stages run, a killed run resumes to exactly the
weights of an uninterrupted one, and the export loads in vlmkit and in transformers alike."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.builtin import render, sample_scene
from vlmkit.errors import InputError
from vlmkit.train import Interrupted, Recipe, train
from vlmkit.train.batches import generation_prompt_ids, understanding_row
from vlmkit.train.checkpoint import load_training_state
from vlmkit.builtin.source import write_shapes_dataset
from vlmkit.train.data import UnderstandingExample

TINY = {
    "seed": 3,
    "threads": 1,
    "model": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
              "num_heads": 2, "num_kv_heads": 2, "vision_hidden_size": 32, "vision_layers": 1, "vision_heads": 2,
              "vq_codebook_size": 64, "vq_latent_channels": 32, "vq_base_channels": 32,
              "vq_channel_multiplier": [1, 1, 1, 2], "vocab_size": 400},
    "data": {"two_object_share": 0.7, "canonical_generation": True, "canonical_on_token_grid": True},
    "vq": {"steps": 4, "batch_size": 3, "warmup": 2, "restart_dead_codes_every": 2, "restart_worst_served": True,
           "crop_size": 16, "full_image_steps": 2, "patchwise": True},
    "vision": {"steps": 3, "batch_size": 3, "warmup": 1},
    "lm": {"steps": 4, "understanding_batch": 3, "generation_batch": 3, "warmup": 2, "caption_dropout": 0.5,
           "caption_recall_weight": 0.5, "image_embeddings_from_codebook": True, "patch_label_weight": 0.5,
           "binding_attention_weight": 0.5, "question_label_weight": 0.5},
    "checkpoint_every": 3,
    "guidance_scale": 1.5,
}


def tiny_recipe(**changes) -> Recipe:
    values = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    if changes.get("data", {}).get("source") == "jsonl":  # the shapes world's data keys cannot apply to files
        values["data"] = changes["data"]
    return Recipe.from_dict(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted tiny run."""
    return train(tiny_recipe(), tmp_path_factory.mktemp("uninterrupted") / "run", progress=False)


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(trained, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_recipe(), out, progress=False, halt_after=2)  # mid VQ stage
    assert json.loads((out / "training" / "recipe.json").read_text())["seed"] == 3
    with pytest.raises(Interrupted):
        train(None, out, resume=True, progress=False, halt_after=3)  # through the stage change, mid vision
    with pytest.raises(Interrupted):
        train(None, out, resume=True, progress=False, halt_after=4)  # mid LM
    train(None, out, resume=True, progress=False)
    resumed, expected = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_a_time_limited_sitting_checkpoints_and_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_recipe(), out, progress=False, time_limit=0)  # a spent limit: one step, then stop
    assert load_training_state(out / "training" / "checkpoint.pt")["state"]["step"] == 1
    train(None, out, resume=True, progress=False, time_limit=3600)
    resumed, expected = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_the_train_command_refuses_a_time_limit_that_is_not_positive(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text(json.dumps(TINY))
    assert main(["train", "--config", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "out"),
                 "--time-limit", "-5"]) == 1
    assert "--time-limit must be a positive number of minutes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_export_loads_in_vlmkit_and_transformers_with_the_same_greedy_answer(trained):
    from transformers import JanusForConditionalGeneration as Reference
    from transformers import JanusProcessor as ReferenceProcessor

    from vlmkit import JanusForConditionalGeneration, JanusProcessor

    messages = [{"role": "user", "content": [{"type": "image", "image": render(sample_scene(random.Random(1)), 32)},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    ours, processor = JanusForConditionalGeneration.from_pretrained(trained), JanusProcessor.from_pretrained(trained)
    reference, info = Reference.from_pretrained(trained, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert ours.model.vqmodel.patchwise  # the recipe's tokenisation travels with the checkpoint
    reference_processor = ReferenceProcessor.from_pretrained(trained)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected_inputs = reference_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, reference(**expected_inputs).logits, atol=1e-4, rtol=0)
    assert ours.generate(**inputs, max_new_tokens=6).tolist() == \
        reference.generate(**expected_inputs, max_new_tokens=6, do_sample=False).tolist()


def test_training_rows_are_what_inference_feeds(trained):
    from vlmkit import JanusProcessor
    processor = JanusProcessor.from_pretrained(trained)
    image = render(sample_scene(random.Random(2)), 32)
    messages = [{"role": "user", "content": "Where is the shape?"}, {"role": "assistant", "content": "left"}]
    ids, labels, _ = understanding_row(processor, UnderstandingExample(image, messages))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": image},
                                                                         {"type": "text", "text": "Where is the shape?"}]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = prompt["input_ids"][0].tolist()
    answer = processor.tokenizer.encode(" left", add_special_tokens=False) + [processor.tokenizer.eos_token_id]
    assert ids == prompt_ids + answer
    assert labels == [-100] * len(prompt_ids) + answer
    imagine = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "a red circle"}]}], add_generation_prompt=True),
        generation_mode="image")
    assert generation_prompt_ids(processor, "a red circle") == imagine["input_ids"][0].tolist()


def test_train_command_on_jsonl_data(tmp_path, capsys):
    understanding, generation = write_shapes_dataset(tmp_path / "data", count=6, seed=0, image_size=32)
    recipe = dict(TINY, data={"source": "jsonl", "understanding": str(understanding), "generation": str(generation)},
                  vq={"steps": 0}, vision={"steps": 0},
                  lm={"steps": 1, "understanding_batch": 2, "generation_batch": 2})
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["train", "--config", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "out")]) == 1
    assert "--resume" in capsys.readouterr().err


def test_recipes_with_unknown_keys_are_refused():
    with pytest.raises(InputError, match="unknown key.*lm.*stepz"):
        Recipe.from_dict({"lm": {"stepz": 3}})


@pytest.mark.parametrize("values, message", [
    ({"lm": {"steps": "ten"}}, "recipe.lm.steps must be an integer, got 'ten'"),
    ({"lm": {"lr": True}}, "recipe.lm.lr must be a number, got True"),
    ({"lm": {"binding_attention_layer": 1.5}}, "recipe.lm.binding_attention_layer must be an integer or null"),
    ({"model": {"vq_channel_multiplier": [1, "2"]}}, "vq_channel_multiplier must be a list of integers"),
    ({"data": {"canonical_generation": "yes"}}, "recipe.data.canonical_generation must be true or false"),
    ({"init_from": 3}, "recipe.init_from must be a string or null, got 3"),
])
def test_recipe_values_of_the_wrong_type_are_refused_by_name(values, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        Recipe.from_dict(values)


def test_recipe_numbers_may_be_written_as_integers_and_optional_values_as_null():
    recipe = Recipe.from_dict({"lm": {"lr": 1, "binding_attention_layer": None}, "guidance_scale": 2})
    assert recipe.lm.lr == 1 and recipe.lm.binding_attention_layer is None and recipe.guidance_scale == 2


@pytest.mark.parametrize("worst_served", [False, True])
def test_dead_codes_restart_where_the_codebook_serves_worst_when_asked(worst_served):
    from types import SimpleNamespace

    from vlmkit.train.stages import restart_dead_codes

    # latents = the "pixels" themselves: 60 background latents right on code 0, 4 edge latents far from it
    latents = torch.zeros(1, 2, 8, 8)
    latents[0, 0] = 1.0
    latents[0, :, 0, :4] = torch.tensor([0.0, 1.0])[:, None]
    vq = SimpleNamespace(latents=lambda pixel_values: pixel_values,
                         quantize=SimpleNamespace(embedding=torch.nn.Embedding(4, 2)))
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [1.0, -0.1]]))
    usage = torch.tensor([60, 0, 0, 0])
    assert restart_dead_codes(vq, usage, latents, torch.Generator().manual_seed(0), worst_served) == 3
    moved = vq.quantize.embedding.weight[1:]
    on_edges = (moved[:, 1] > 0.9).sum().item()
    assert on_edges == 3 if worst_served else on_edges < 3  # uniform picks: mostly background


def test_object_weighted_generation_loss_weighs_tokens_off_the_background():
    from torch.nn import functional as F
    from vlmkit.train.stages import object_weighted_loss
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=generator)
    tokens = torch.tensor([[1, 1, 3], [2, 4, 2]])  # backgrounds: 1 and 2
    labels = torch.tensor([[-100, -100, -100, 1, 1, 3, -100], [-100, -100, -100, -100, 2, 4, 2]])
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp_min(0), reduction="none")
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(object_weighted_loss(logits, labels, tokens, 1.0), plain)
    objects = per_token[0, 4] + per_token[1, 4]  # the 3 in row 0 and the 4 in row 1 (predicted one step early)
    background = per_token[0, 2] + per_token[0, 3] + per_token[1, 3] + per_token[1, 5]
    assert torch.allclose(object_weighted_loss(logits, labels, tokens, 5.0), (5 * objects + background) / 14)


def test_caption_recall_loss_is_the_caption_words_cross_entropy_at_the_image_positions():
    from types import SimpleNamespace

    from torch.nn import functional as F
    from vlmkit.train.stages import caption_recall_loss

    head = torch.nn.Linear(4, 6, bias=False)
    model = SimpleNamespace(lm_logits=head)
    hidden = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(1))
    # row 0: a 3-token prompt, image positions 2..5; row 1: caption dropped; row 2: a 5-token prompt
    got = caption_recall_loss(model, hidden, [3, 4, 5], 4, [[1, 4], [], [2, 2, 5]])
    first = F.log_softmax(head(hidden[0, 2:6]), -1)
    second = F.log_softmax(head(hidden[2, 4:8]), -1)
    expected = (-(first[:, 1] + first[:, 4]) / 2).mean() / 2 + (-second[:, 2] * 2 / 3 - second[:, 5] / 3).mean() / 2
    assert torch.allclose(got, expected)
    assert caption_recall_loss(model, hidden, [3, 4, 5], 4, [[], [], []]) is None


def test_the_lm_starts_from_the_vq_codes_when_asked(tmp_path):
    from torch.nn import functional as F

    out = train(tiny_recipe(lm={"steps": 0}), tmp_path / "run", progress=False)
    weights = load_file(str(out / "model.safetensors"))
    codes = F.normalize(weights["model.vqmodel.quantize.embedding.weight"], dim=-1)
    assert torch.allclose(weights["model.generation_embeddings.weight"], codes)
    plain = train(tiny_recipe(lm={"steps": 0, "image_embeddings_from_codebook": False}), tmp_path / "plain",
                  progress=False)
    assert not torch.allclose(load_file(str(plain / "model.safetensors"))["model.generation_embeddings.weight"], codes)


def test_the_recipe_sets_the_checkpoints_default_guidance(trained):
    from vlmkit.models.janus.modeling import JanusForConditionalGeneration
    assert json.loads((trained / "generation_config.json").read_text())["guidance_scale"] == 1.5
    assert JanusForConditionalGeneration.from_pretrained(trained).generation_config.guidance_scale == 1.5


def test_the_auxiliary_losses_are_logged_and_token_grid_needs_canonical_pictures(trained, tmp_path):
    log = [json.loads(line) for line in (trained / "training" / "log.jsonl").read_text().splitlines()]
    assert any("caption recall" in row for row in log if row.get("stage") == "lm")
    assert any("binding" in row for row in log if row.get("stage") == "lm")
    assert any({"named shape", "named colour", "named position"} <= set(row) for row in log if row.get("stage") == "lm")
    assert all({"patch shape", "patch colour", "patch position"} <= set(row) for row in log if row.get("stage") == "lm")
    with pytest.raises(InputError, match="canonical_on_token_grid needs data.canonical_generation"):
        train(tiny_recipe(data={"canonical_generation": False}), tmp_path / "run", progress=False)


def test_the_recipes_shipped_in_the_repo_are_valid():
    from pathlib import Path
    recipes = sorted((Path(__file__).resolve().parent.parent / "scripts" / "recipes").glob("*.json"))
    assert recipes
    for path in recipes:
        Recipe.from_file(path)


def test_the_vision_stage_trains_the_vision_tower_alone(tmp_path):
    pretrained = load_file(str(train(tiny_recipe(lm={"steps": 0}), tmp_path / "vision", progress=False)
                               / "model.safetensors"))
    plain = load_file(str(train(tiny_recipe(lm={"steps": 0}, vision={"steps": 0}), tmp_path / "plain", progress=False)
                          / "model.safetensors"))
    for name in plain:
        changed = not torch.equal(pretrained[name], plain[name])
        if name.startswith("model.vision_model.") and name.endswith(".weight") and "norm" not in name:
            assert changed, name
        elif not name.startswith("model.vision_model."):
            assert not changed, name
    log = [json.loads(line) for line in (tmp_path / "vision" / "training" / "log.jsonl").read_text().splitlines()]
    assert {"shape", "colour", "position"} <= set(next(row for row in log if row["stage"] == "vision"))


def test_the_vision_stage_needs_the_shapes_world(tmp_path):
    understanding, generation = write_shapes_dataset(tmp_path / "data", count=2, seed=0, image_size=32)
    recipe = tiny_recipe(data={"source": "jsonl", "understanding": str(understanding), "generation": str(generation),
                               "canonical_generation": False, "canonical_on_token_grid": False})
    with pytest.raises(InputError, match="vision stage and lm.patch_label_weight need data.source 'shapes'"):
        train(recipe, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="lm.patch_label_weight need data.source 'shapes'"):
        train(tiny_recipe(data=recipe.data.__dict__, vision={"steps": 0}), tmp_path / "again", progress=False)


def test_the_label_loss_is_each_tokens_cross_entropy_per_label():
    from torch.nn import functional as F
    from vlmkit.builtin.label_heads import PATCH_LABELS
    from vlmkit.builtin.label_heads import label_loss

    generator = torch.Generator().manual_seed(2)
    sizes = [len(values) + 1 for values in PATCH_LABELS.values()]
    tower = torch.nn.Linear(3, 4)
    head = torch.nn.Linear(4, sum(sizes))
    pixels = torch.randn(2, 6, 3, generator=generator)
    labels = {name: torch.randint(0, size, (2, 6), generator=generator) for name, size in zip(PATCH_LABELS, sizes)}
    logits = head(tower(pixels)).split(sizes, dim=-1)
    losses = label_loss(head, tower(pixels), labels)
    for (name, size), block in zip(zip(PATCH_LABELS, sizes), logits):
        assert torch.allclose(losses[name], F.cross_entropy(block.reshape(-1, size), labels[name].reshape(-1)))
    assert torch.allclose(losses["loss"], sum(losses[name] for name in PATCH_LABELS))


def test_the_image_token_cache_gives_the_vq_tokens_and_encodes_each_picture_once(trained):
    from vlmkit.models.janus.modeling import JanusForConditionalGeneration
    from vlmkit.models.janus.processing import JanusProcessor
    from vlmkit.train.stages import ImageTokenCache

    model = JanusForConditionalGeneration.from_pretrained(trained, dtype=torch.float32)
    scenes = [sample_scene(random.Random(i)) for i in range(3)]
    pixels = JanusProcessor.from_pretrained(trained).image_processor(
        [render(scenes[i], 32) for i in (0, 1, 0, 2)])["pixel_values"]
    vq = model.model.vqmodel
    cache = ImageTokenCache(vq)
    with torch.no_grad():
        expected = vq.encode(pixels)
    assert torch.equal(cache(pixels, "cpu"), expected)
    assert len(cache.tokens) == 3  # the repeated picture is encoded once
    assert torch.equal(cache(pixels[[2, 3]], "cpu"), expected[[2, 3]])
    assert len(cache.tokens) == 3


def test_answer_query_positions_are_the_ones_before_each_answer():
    from vlmkit.builtin.binding import answer_query_positions

    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, -100], [-100, 3, -100, -100, -100, -100, -100, -100]])
    assert answer_query_positions(labels) == [[1, 5], [0]]


def test_the_binding_loss_is_minus_log_the_heads_attention_on_the_asked_about_object(trained):
    """Checked against transformers' own attention weights (eager attention) on the same checkpoint."""
    from transformers import JanusForConditionalGeneration as Reference

    from vlmkit import JanusForConditionalGeneration, JanusProcessor
    from vlmkit.builtin.shapes import patch_labels
    from vlmkit.train.batches import understanding_batch
    from vlmkit.builtin.source import ShapesSource
    from vlmkit.builtin.binding import ForwardRecord, binding_attention_loss

    model, processor = JanusForConditionalGeneration.from_pretrained(trained), JanusProcessor.from_pretrained(trained)
    reference = Reference.from_pretrained(trained, attn_implementation="eager")
    source = ShapesSource(32, questions_per_image=3, two_object_share=0.7)
    examples = [source.understanding(random.Random(f"binding:{i}")) for i in range(4)]
    batch = understanding_batch(processor, examples)
    layer, head = 1, 1
    with torch.no_grad():
        with ForwardRecord(model.text_model.layers[layer].self_attn) as attention:
            model(**batch)
        ours = binding_attention_loss(attention, head, batch["input_ids"], batch["labels"], examples,
                                      model.config.image_token_id, 32, 8)
        weights = reference(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                            output_attentions=True).attentions[layer][:, head]  # [rows, queries, keys]
    expected = []
    for row, example in enumerate(examples):
        labels = batch["labels"][row].tolist()
        starts = [p for p in range(1, len(labels)) if labels[p] != -100 and labels[p - 1] == -100]
        ids = batch["input_ids"][row].tolist()
        image_positions = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
        cells = patch_labels(example.scene, 32, 8)
        for start, subject in zip(starts, example.subjects):
            if subject is not None:
                target = [p for p, cell in zip(image_positions, cells) if cell == subject + 1]
                expected.append(-torch.log(weights[row, start - 1, target].sum()))
    assert len(expected) >= 4
    assert torch.allclose(ours, torch.stack(expected).mean(), atol=1e-5)


def test_the_binding_loss_needs_the_shapes_world_and_a_real_layer_and_head(tmp_path):
    paths = write_shapes_dataset(tmp_path / "data", 3, seed=0, image_size=32)
    jsonl = {"source": "jsonl", "understanding": str(paths[0]), "generation": str(paths[1]),
             "canonical_generation": False, "canonical_on_token_grid": False}
    no_patches = {"steps": 1, "patch_label_weight": 0.0, "binding_attention_weight": 1.0}
    with pytest.raises(InputError, match="lm.binding_attention_weight and lm.question_label_weight need data.source"):
        train(tiny_recipe(data=jsonl, vision={"steps": 0}, lm=no_patches), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="binding_attention_layer must name one of the LM's 2 layers"):
        train(tiny_recipe(lm={"binding_attention_weight": 1.0, "binding_attention_layer": 2}), tmp_path / "b",
              progress=False)
    with pytest.raises(InputError, match="binding_attention_head one of its 2 heads"):
        train(tiny_recipe(lm={"binding_attention_weight": 1.0, "binding_attention_head": 2}), tmp_path / "c",
              progress=False)


def test_the_question_label_loss_reads_what_each_question_names_at_its_answer_position():
    from torch.nn import functional as F
    from vlmkit.builtin.shapes import Scene, SceneObject
    from vlmkit.builtin.label_heads import PATCH_LABELS, named_classes
    from vlmkit.builtin.binding import ForwardRecord, question_label_loss

    red = 1 + list(PATCH_LABELS["colour"]).index("red")
    assert named_classes("Where is the red circle?") == {"shape": 1, "colour": red, "position": 0}
    assert named_classes("What colour is the shape on the left?") == {"shape": 0, "colour": 0, "position": 1}
    scene = Scene("white", (SceneObject("circle", "red", "left"), SceneObject("star", "blue", "right")))
    messages = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "Where is the blue star?"}, {"role": "assistant", "content": "right"}]
    example = UnderstandingExample(render(scene, 32), messages, scene, [None, 1])
    labels = torch.tensor([[-100, -100, 7, -100, -100, -100, 9, -100]])
    attention = ForwardRecord(torch.nn.Identity())
    attention.args = (torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(0)),)
    sizes = [len(values) + 1 for values in PATCH_LABELS.values()]
    head = torch.nn.Linear(6, sum(sizes))
    losses = question_label_loss(head, attention, labels, [example])
    expected = named_classes("Where is the blue star?")
    for (name, size), block in zip(zip(PATCH_LABELS, sizes), head(attention.args[0][0, 5]).split(sizes)):
        assert torch.allclose(losses[name], F.cross_entropy(block[None], torch.tensor([expected[name]])))


def test_a_training_state_with_the_older_vision_projection_name_resumes(trained, tmp_path):
    """States saved while the vision attention output was named ``out_proj`` resume to the same weights."""
    from vlmkit.train.checkpoint import save_training_state

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_recipe(), out, progress=False, halt_after=3)
    path = out / "training" / "checkpoint.pt"
    saved = load_training_state(path)
    older = {name.replace(".self_attn.projection_layer.", ".self_attn.out_proj."): t for name, t in saved["model"].items()}
    assert older.keys() != saved["model"].keys()
    save_training_state(path, {**saved, "model": older})
    train(None, out, resume=True, progress=False)
    resumed, expected = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_a_checkpoint_whose_label_head_has_other_classes_is_refused_clearly(tmp_path):
    from vlmkit.train.checkpoint import save_training_state

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_recipe(), out, progress=False, halt_after=5)  # mid vision stage
    path = out / "training" / "checkpoint.pt"
    saved = load_training_state(path)
    saved["vision_head"] = torch.nn.Linear(32, 14).state_dict()  # an older vlmkit's 14 classes
    save_training_state(path, saved)
    with pytest.raises(InputError, match="checkpoint's vision_head does not fit this vlmkit's labels"):
        train(None, out, resume=True, progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"lm": {"lr": -1}}, "recipe.lm.lr must be above 0, got -1"),
    ({"vq": {"lr": float("nan")}}, "recipe.vq.lr must be a finite number, got nan"),
    ({"vq": {"batch_size": 0}}, "recipe.vq.batch_size must be 1 or more, got 0"),
    ({"lm": {"steps": -3}}, "recipe.lm.steps must be 0 or more, got -3"),
    ({"lm": {"caption_dropout": 1.5}}, "recipe.lm.caption_dropout must be from 0 to 1"),
    ({"checkpoint_every": 0}, "recipe.checkpoint_every must be 1 or more"),
    ({"threads": -2}, "recipe.threads must be 0 or more"),
    ({"export_dtype": "int3"}, "recipe.export_dtype must be one of float32"),
    ({"guidance_scale": 500}, "recipe.guidance_scale must be from 0 to 100"),
    ({"model": {"num_heads": 3}}, r"recipe.model.hidden_size \(64\) must be a multiple of model.num_heads \(3\)"),
    ({"model": {"vq_channel_multiplier": [1, 2]}}, "the VQ grid .* must match the vision patch grid"),
    ({"vq": {"crop_size": 12}}, "recipe.vq.crop_size must be a multiple of 8"),
    ({"lm": {"understanding_batch": 0, "generation_batch": 0}}, "an LM step needs examples"),
    ({"data": {"source": "jsonl"}}, "'jsonl' needs data.understanding and/or data.generation"),
    ({"data": {"source": "csv"}}, "recipe.data.source must be 'shapes' or 'jsonl', got 'csv'"),
])
def test_recipe_values_no_run_can_use_are_refused_by_name(changes, message):
    with pytest.raises(InputError, match=message):
        tiny_recipe(**changes)


def test_a_recipe_file_that_cannot_be_read_is_refused_by_name(tmp_path):
    (tmp_path / "nan.json").write_text('{"lm": {"lr": NaN}}')  # Python's JSON reader takes NaN
    with pytest.raises(InputError, match="recipe.lm.lr must be a finite number"):
        Recipe.from_file(tmp_path / "nan.json")
    (tmp_path / "latin1.json").write_bytes(b'{"init_from": "caf\xe9"}')
    with pytest.raises(InputError, match="is not UTF-8 text"):
        Recipe.from_file(tmp_path / "latin1.json")
    with pytest.raises(InputError, match="is a folder"):
        Recipe.from_file(tmp_path)


def test_a_bad_recipe_stops_the_train_command_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text(json.dumps(dict(TINY, vq=dict(TINY["vq"], batch_size=0))))
    assert main(["train", "--config", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "recipe.vq.batch_size must be 1 or more" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_new_run_never_writes_into_a_folder_of_the_users_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    with pytest.raises(InputError, match="is not empty .*config.json.*choose a new or empty folder"):
        train(tiny_recipe(), out, progress=False)
    assert (out / "config.json").read_text() == "my own config" and not (out / "training").exists()
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(InputError, match="is a file"):
        train(tiny_recipe(), tmp_path / "a_file", progress=False)
    assert (tmp_path / "a_file").read_text() == "keep"


def test_a_run_that_stopped_before_its_first_checkpoint_may_start_again(tmp_path):
    from vlmkit.train.preflight import check_new_run_folder
    out = tmp_path / "run"
    (out / "training").mkdir(parents=True)
    (out / "training" / "recipe.json").write_text("{}")
    (out / "config.json").write_text("{}")
    check_new_run_folder(out)  # nothing of the user's, nothing to resume: no error
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(InputError, match="not empty"):
        check_new_run_folder(out)


def test_init_from_must_name_a_janus_checkpoint_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="recipe.init_from: checkpoint folder .*does not exist"):
        train(Recipe.from_dict({"init_from": str(tmp_path / "missing")}), tmp_path / "run", progress=False)
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(InputError, match="is a llava checkpoint; fine-tuning needs a Janus checkpoint"):
        train(Recipe.from_dict({"init_from": str(llava)}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, message", [
    (b"{not json", r"u.jsonl:2 is not valid JSON"),
    (b"[1, 2]", r"u.jsonl:2 must be a JSON object with image, conversation, got list"),
    (b'{"image": "0.png"}', r"u.jsonl:2 lacks conversation"),
    (b'{"image": 3, "conversation": []}', r"u.jsonl:2: image must be a path"),
    (b'{"image": "0.png", "conversation": "hi"}', r"u.jsonl:2: conversation must be a non-empty list"),
    (b'{"image": "0.png", "conversation": [{"role": "assistant", "content": "red"}]}',
     r"u.jsonl:2: a conversation must start with the user's turn"),
    (b'{"image": "0.png", "conversation": [{"role": "user", "content": 5}]}',
     r"u.jsonl:2: conversation messages need a role"),
    (b'{"image": "nowhere.png", "conversation": [{"role": "user", "content": "q"}, '
     b'{"role": "assistant", "content": "a"}]}', r"u.jsonl:2: image .*nowhere.png does not exist"),
    (b'{"image": "u.jsonl", "conversation": [{"role": "user", "content": "q"}, '
     b'{"role": "assistant", "content": "a"}]}', r"u.jsonl:2: image .*u.jsonl cannot be read"),
    (b'{"image": "0.png", "caption": "caf\xe9"}', r"u.jsonl:2 is not UTF-8 text"),
])
def test_a_bad_jsonl_line_stops_the_run_before_anything_is_written(tmp_path, line, message):
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    good = {"image": "0.png", "conversation": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "u.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + line + b"\n")
    recipe = tiny_recipe(data={"source": "jsonl", "understanding": str(tmp_path / "u.jsonl")}, vision={"steps": 0},
                         lm={"patch_label_weight": 0, "binding_attention_weight": 0, "question_label_weight": 0})
    with pytest.raises(InputError, match=message):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_jsonl_data_path_that_is_empty_or_a_folder_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    for path, message in ((tmp_path / "empty.jsonl", "holds no examples"), (tmp_path, "is a folder")):
        recipe = tiny_recipe(data={"source": "jsonl", "generation": str(path)}, vision={"steps": 0},
                             lm={"patch_label_weight": 0, "binding_attention_weight": 0, "question_label_weight": 0})
        with pytest.raises(InputError, match=message):
            train(recipe, tmp_path / "run", progress=False)


def test_resume_refuses_another_recipe_and_a_damaged_checkpoint(tmp_path):
    out = tmp_path / "run"
    (out / "training").mkdir(parents=True)
    (out / "training" / "recipe.json").write_text(json.dumps(tiny_recipe().to_dict()))
    (out / "training" / "checkpoint.pt").write_bytes(b"half a checkpoint")  # as a full disk leaves it
    with pytest.raises(InputError, match="--resume continues the run's own recipe"):
        train(tiny_recipe(lm={"steps": 40}), out, resume=True, progress=False)
    with pytest.raises(InputError, match="cannot read the training checkpoint .* it is damaged"):
        train(tiny_recipe(), out, resume=True, progress=False)
