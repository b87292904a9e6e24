"""Checkpoint folders in the file sets real Hub repos hold (written by older transformers versions and by
their authors: preprocessor_config.json, chat_template.json, special_tokens_map.json, added_tokens.json,
sharded weights, torch_dtype, short diff-style nested configs...; see tests/builders/real_layouts.py), each
loaded by transformers 5.23 and by vlmkit: the same processor outputs, fp32 logits and greedy tokens, and
`vlmkit chat` and `vlmkit.LLM(...).chat` give transformers' greedy answer."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)

NEW_TOKENS = 6
QUESTION = "What is shown?"

# layout name -> (family, builder function name, source fixture, builder options)
LAYOUTS = {
    "llava-onevision-qwen2-0.5b-ov-hf": ("llava", "write_onevision_hub_layout", "llava_onevision_tied_dir",
                                         dict(tie_in_text_config_only=True)),
    "llava-onevision-qwen2-7b-ov-hf": ("llava", "write_onevision_hub_layout", "llava_onevision_dir",
                                       dict(shards=4, long_text_config=True)),
    "llava-onevision-qwen2-0.5b-si-hf": ("llava", "write_onevision_hub_layout", "llava_onevision_dir",
                                         dict(template_file="chat_template.jinja", shortest_edge_size=True)),
    "deepseek-community/Janus-Pro-1B": ("janus", "write_janus_community_layout", "janus_dir",
                                        dict(template_file="chat_template.json")),
    "deepseek-community/Janus-Pro-7B": ("janus", "write_janus_community_layout", "janus_dir",
                                        dict(shards=2, short_config=True)),
    "idefics-9b": ("idefics", "write_idefics_hub_layout", "idefics_resampler_dir", dict(shards=2)),
    "idefics-9b-instruct": ("idefics", "write_idefics_hub_layout", "idefics_resampler_dir",
                            dict(short_config=True, template_file="tokenizer_config.json")),
}


@pytest.fixture(scope="module")
def layouts(request, tmp_path_factory) -> dict:
    """Every layout, written once for the module from the session's tiny checkpoints."""
    from builders import real_layouts

    folders = {}
    for name, (_, writer, source, options) in LAYOUTS.items():
        out = tmp_path_factory.mktemp(name.replace("/", "_"))
        folders[name] = getattr(real_layouts, writer)(request.getfixturevalue(source), out, **options)
    return folders


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (50, 70, 3)).astype(np.uint8))


def _reference(family: str, folder):
    """transformers' (processor, fp32 model) for a folder."""
    import transformers

    if family == "llava":
        from builders.llava_onevision import reference_processor

        processor, model_class = reference_processor(folder), transformers.LlavaOnevisionForConditionalGeneration
    elif family == "janus":
        processor, model_class = transformers.JanusProcessor.from_pretrained(str(folder), backend="pil"), \
            transformers.JanusForConditionalGeneration
    else:
        processor, model_class = transformers.IdeficsProcessor.from_pretrained(str(folder), backend="pil"), \
            transformers.IdeficsForVisionText2Text
    return processor, model_class.from_pretrained(str(folder), dtype=torch.float32).eval()


def _inputs(family: str, processor, picture):
    """One question about ``picture`` as model inputs: through the chat template, or for IDEFICS (whose
    transformers processor renders chats without their images) as the model card's prompt list."""
    if family == "idefics":
        return processor(text=[["User:", picture, f"{QUESTION}<end_of_utterance>", "\nAssistant:"]])
    conversation = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": QUESTION}]}]
    options = {"generation_mode": "text"} if family == "janus" else {}
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", **options)


def _greedy(family: str, model, inputs) -> torch.Tensor:
    options = {"generation_mode": "text"} if family == "janus" else {}
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **options)


@pytest.fixture(scope="module")
def reference_answers(layouts, picture) -> dict:
    """transformers' (inputs, logits, greedy ids, answer text) per layout."""
    answers = {}
    for name, folder in layouts.items():
        family = LAYOUTS[name][0]
        processor, model = _reference(family, folder)
        inputs = _inputs(family, processor, picture)
        with torch.no_grad():
            logits = model(**inputs).logits
        ids = _greedy(family, model, inputs)
        text = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers[name] = (inputs, logits, ids, text)
    return answers


@pytest.mark.parametrize("name", LAYOUTS)
def test_hub_layout_matches_transformers(name, layouts, reference_answers, picture):
    import vlmkit

    family = LAYOUTS[name][0]
    expected_inputs, expected_logits, expected_ids, _ = reference_answers[name]
    processor = vlmkit.AutoProcessor.from_pretrained(layouts[name])
    model = vlmkit.AutoModel.from_pretrained(layouts[name], dtype=torch.float32)
    inputs = _inputs(family, processor, picture)
    assert set(inputs) == set(expected_inputs)
    for key in expected_inputs:
        assert torch.equal(torch.as_tensor(inputs[key]), torch.as_tensor(expected_inputs[key])), key
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - expected_logits).abs().max() < 1e-4
    assert _greedy(family, model, inputs).tolist() == expected_ids.tolist()


@pytest.mark.parametrize("name", LAYOUTS)
def test_hub_layout_loads_in_the_checkpoints_dtype_as_transformers(name, layouts):
    import transformers

    import vlmkit

    folder = layouts[name]
    model_class = {"llava": transformers.LlavaOnevisionForConditionalGeneration,
                   "janus": transformers.JanusForConditionalGeneration,
                   "idefics": transformers.IdeficsForVisionText2Text}[LAYOUTS[name][0]]
    expected = {n: p.dtype for n, p in model_class.from_pretrained(str(folder)).named_parameters()}
    got = {n: p.dtype for n, p in vlmkit.AutoModel.from_pretrained(folder).named_parameters()}
    assert set(got.values()) == set(expected.values())  # torch_dtype of the older files, as transformers reads it


# one layout per family for the command line and the offline LLM (each starts a model)
ENTRY_LAYOUTS = ["llava-onevision-qwen2-7b-ov-hf", "deepseek-community/Janus-Pro-1B", "idefics-9b"]


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ENTRY_LAYOUTS)
def test_vlmkit_chat_command_answers_as_transformers(name, layouts, reference_answers, picture, tmp_path):
    # idefics-9b has no chat template: vlmkit's default writes the instruct model card's prompt, the one the
    # reference is given here
    path = tmp_path / "picture.png"
    path.write_bytes(_png(picture))
    env = {**{k: v for k, v in os.environ.items() if k != "VLMKIT_MODEL"}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", "--model", str(layouts[name]), "--image",
                             str(path), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(NEW_TOKENS),
                             QUESTION], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == reference_answers[name][3].strip()


def test_offline_llm_chat_answers_as_transformers(layouts, reference_answers, picture):
    import vlmkit

    image_url = "data:image/png;base64," + base64.b64encode(_png(picture)).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                           {"type": "text", "text": QUESTION}]}
    for name in ENTRY_LAYOUTS:
        llm = vlmkit.LLM(str(layouts[name]), dtype="float32", device="cpu")
        try:
            output = llm.chat([message], {"max_tokens": NEW_TOKENS, "temperature": 0}, use_tqdm=False)
        finally:
            llm.close()
        assert output[0].outputs[0].text == reference_answers[name][3], name


def test_chat_template_in_tokenizer_config_is_the_one_transformers_tokenizer_renders(janus_dir, tmp_path):
    # transformers' JanusProcessor does not take a template from tokenizer_config.json (its apply_chat_template
    # says the processor has none); its tokenizer does, and vlmkit's processor renders the same prompt with it
    import transformers
    from builders.real_layouts import write_janus_community_layout

    import vlmkit

    folder = write_janus_community_layout(janus_dir, tmp_path / "janus", template_file="tokenizer_config.json")
    conversation = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    expected = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    assert vlmkit.AutoProcessor.from_pretrained(folder).apply_chat_template(
        conversation, add_generation_prompt=True) == expected


def test_tokenizer_of_a_llava_hf_folder_keeps_its_own_text_template_as_transformers(layouts):
    # llava-hf repos: the processor's template in chat_template.json, Qwen2-Instruct's text template in
    # tokenizer_config.json; transformers' tokenizer never reads chat_template.json
    import transformers

    import vlmkit

    folder = layouts["llava-onevision-qwen2-7b-ov-hf"]
    conversation = [{"role": "user", "content": QUESTION}]
    expected = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    assert vlmkit.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("files", [("chat_template.json", "chat_template.jinja"),
                                   ("processor_config.json", "chat_template.json", "chat_template.jinja"),
                                   ("processor_config.json", "chat_template.jinja")])
def test_processor_picks_its_chat_template_among_several_files_as_transformers(files, layouts, tmp_path):
    # a repo updated by newer transformers versions keeps its older template files beside the new one
    import json
    import shutil

    from builders.llava_onevision import reference_processor

    import vlmkit

    folder = shutil.copytree(layouts["llava-onevision-qwen2-7b-ov-hf"], tmp_path / "folder")
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    (folder / "chat_template.json").unlink()
    for file in files:  # each file's template writes its own name first, so the one used shows
        marked = file + " " + template
        if file == "chat_template.jinja":
            (folder / file).write_text(marked)
        elif file == "chat_template.json":
            (folder / file).write_text(json.dumps({"chat_template": marked}))
        else:
            config = json.loads((folder / file).read_text())
            (folder / file).write_text(json.dumps({**config, "chat_template": marked}))
    conversation = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    expected = reference_processor(folder).apply_chat_template(conversation, add_generation_prompt=True)
    assert expected.startswith(files[0])
    assert vlmkit.AutoProcessor.from_pretrained(folder).apply_chat_template(
        conversation, add_generation_prompt=True) == expected


def test_a_llava_hf_processor_saved_and_loaded_back_keeps_both_templates(layouts, tmp_path):
    """The processor's template (chat_template.json) and the tokenizer's (tokenizer_config.json) survive a save:
    an unchanged template is not written again as chat_template.jinja, which the tokenizer would then read."""
    import vlmkit

    processor = vlmkit.AutoProcessor.from_pretrained(layouts["llava-onevision-qwen2-7b-ov-hf"])
    processor.save_pretrained(tmp_path)
    again = vlmkit.AutoProcessor.from_pretrained(tmp_path)
    assert again.chat_template == processor.chat_template
    assert again.tokenizer.chat_template == processor.tokenizer.chat_template != processor.chat_template
    edited = processor.chat_template + "{# edited #}"
    processor.chat_template = edited
    processor.save_pretrained(tmp_path / "edited")
    assert vlmkit.AutoProcessor.from_pretrained(tmp_path / "edited").chat_template == edited
