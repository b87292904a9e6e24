"""The shipped built-in model: it loads fast, answers about scenes of its world and draws them with
no --model flag, and transformers reads the same checkpoint to the same greedy answers.

The model is not always right (scripts/eval_builtin.py measures how often; docs/builtin_model.md has
the figures), so the scenes and the sampling seed here are pinned cases it gets right: they check the
whole no-flag path end to end, not the accuracy."""

import random
import time
from pathlib import Path

import pytest
import torch

from vlmkit.builtin import BUILTIN_DIR, builtin_model_path
from vlmkit.cli import main
from vlmkit.builtin import QUESTION_TYPES, judge_image, render, sample_scene
from vlmkit.builtin.shapes import question_of_type

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "config.json").is_file(), reason="no built-in model shipped")


@pytest.fixture(autouse=True)
def no_model_override(monkeypatch):
    monkeypatch.delenv("VLMKIT_MODEL", raising=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A model this small gains nothing from a second thread, and on a busy 2-core machine two OpenMP
    # threads spin-wait on each other: one image takes ~20 s instead of ~0.5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_builtin_model_is_small_and_loads_in_under_two_seconds():
    from vlmkit import JanusForConditionalGeneration, JanusProcessor
    assert sum(f.stat().st_size for f in BUILTIN_DIR.iterdir()) < 30 * 1024 ** 2
    # the first model construction in a process imports torch._dynamo (nn.init on the meta device),
    # a one-time cost of torch's that is the same for every checkpoint: warm it before timing
    JanusForConditionalGeneration.from_pretrained(builtin_model_path())
    JanusProcessor.from_pretrained(builtin_model_path())
    started = time.perf_counter()
    model = JanusForConditionalGeneration.from_pretrained(builtin_model_path())
    JanusProcessor.from_pretrained(builtin_model_path())
    assert time.perf_counter() - started < 2.0
    assert model.has_generation_weights


def _scene_file(tmp_path, seed):
    scene = sample_scene(random.Random(f"test-builtin:{seed}"))
    path = tmp_path / f"scene{seed}.png".replace(":", "-")
    render(scene).save(path)
    return scene, path


def test_chat_without_model_flag_answers_most_questions_about_new_scenes(tmp_path, capsys):
    # a model that ignored the image would get about a quarter of these (docs/builtin_model.md: per-type accuracy)
    right = {}
    for kind in QUESTION_TYPES:
        for seed in range(8):
            scene, path = _scene_file(tmp_path, f"{kind}:{seed}")
            question, answer = question_of_type(scene, kind, random.Random(seed))
            assert main(["chat", "--image", str(path), question]) == 0
            right[kind] = right.get(kind, 0) + (capsys.readouterr().out.strip() == answer)
    assert sum(right.values()) >= 0.6 * 8 * len(QUESTION_TYPES), right
    assert min(right.values()) >= 3, right


def test_the_readme_command_describes_its_example(capsys):
    example = EXAMPLES / "a_blue_triangle_on_the_right.png"
    assert main(["chat", "--image", str(example), "What is in this image?"]) == 0
    assert capsys.readouterr().out == "a blue triangle on the right\n"  # as printed, no stray space


def test_imagine_without_model_flag_draws_a_red_circle(tmp_path, capsys):
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "--seed", "0"]) == 0
    from PIL import Image
    image = Image.open(tmp_path / "image-00.png")
    verdict = judge_image(image, "red", "circle")
    assert verdict["colour"] and verdict["shape"], verdict["seen"]


def test_transformers_gives_the_same_greedy_answers(tmp_path):
    from transformers import JanusForConditionalGeneration as Reference
    from transformers import JanusProcessor as ReferenceProcessor

    from vlmkit import JanusForConditionalGeneration, JanusProcessor
    path = builtin_model_path()
    ours, processor = JanusForConditionalGeneration.from_pretrained(path), JanusProcessor.from_pretrained(path)
    reference, reference_processor = Reference.from_pretrained(path), ReferenceProcessor.from_pretrained(path)
    for seed, kind in ((6, "colour"), (7, "describe")):
        scene = sample_scene(random.Random(f"test-builtin:{seed}"))
        question, _ = question_of_type(scene, kind, random.Random(seed))
        messages = [{"role": "user", "content": [{"type": "image", "image": render(scene)},
                                                 {"type": "text", "text": question}]}]
        options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        inputs = processor.apply_chat_template(messages, **options)
        expected_inputs = reference_processor.apply_chat_template(messages, **options)
        assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
        got = ours.generate(**inputs, max_new_tokens=20)
        expected = reference.generate(**expected_inputs, max_new_tokens=20, do_sample=False)
        assert got.tolist() == expected.tolist()
