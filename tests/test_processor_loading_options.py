"""Settings given to from_pretrained (``AutoProcessor.from_pretrained(path, image_mean=..., num_image_tokens=...,
pad_token=...)``) do what they do in transformers: each reaches the image processor, the processor or the
tokenizer it names. Every case compares vlmkit's output with transformers' (PIL backend) loaded with the same
keywords from the same tiny checkpoint, for all three families."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

PROMPTS = {"janus_dir": "<image_placeholder>\nWhat is shown here?",
           "llava_onevision_dir": "<|im_start|>user <image>\nWhat is shown here?<|im_end|>"}
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}{% if add_generation_prompt %}<go>{% endif %}"


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (23, 37, 3), dtype=np.uint8))


def reference_processor(folder, **options):
    """transformers' processor of ``folder`` loaded with ``options``, images through its PIL backend. LLaVA-OneVision
    is put together as its from_pretrained does, with the video processor tests/builders gives (see
    ``builders.llava_onevision.reference_processor``)."""
    if json.loads((folder / "config.json").read_text())["model_type"] != "llava_onevision":
        return transformers.AutoProcessor.from_pretrained(str(folder), backend="pil", **options)
    from builders.llava_onevision import _reference_video_processor_class, video_processor_class_registered

    cls = transformers.LlavaOnevisionProcessor
    processor_dict, options = cls.get_processor_dict(str(folder), **options)
    args = [transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil", **options),
            transformers.AutoTokenizer.from_pretrained(str(folder), **options),
            _reference_video_processor_class().from_pretrained(str(folder), **options)]
    with video_processor_class_registered():
        return cls.from_args_and_dict(args, processor_dict, **options)


def assert_same_features(ours, reference):
    assert sorted(ours) == sorted(reference)
    for key in reference:
        got, want = ours[key], reference[key]
        if key.startswith("pixel_values"):
            assert tuple(got.shape) == tuple(want.shape), key
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32))
        else:
            assert torch.as_tensor(got).tolist() == torch.as_tensor(want).tolist(), key


@pytest.mark.parametrize("fixture,options", [
    ("janus_dir", dict(image_mean=[0.1, 0.2, 0.3])), ("janus_dir", dict(do_resize=False)),
    ("janus_dir", dict(size={"height": 48, "width": 48})), ("janus_dir", dict(num_image_tokens=4)),
    ("janus_dir", dict(resample=0, min_size=30)), ("janus_dir", dict(use_default_system_prompt=False)),
    ("llava_onevision_dir", dict(image_mean=0.25, image_std=[0.2, 0.3, 0.4])),
    ("llava_onevision_dir", dict(do_rescale=False, resample=0)),
    ("llava_onevision_dir", dict(num_image_tokens=16, vision_feature_select_strategy="default")),
    ("llava_onevision_dir", dict(image_grid_pinpoints=[[42, 84], [84, 84]])),
])
def test_processor_settings_given_at_load_match_transformers(fixture, options, request, image):
    folder = request.getfixturevalue(fixture)
    reference = reference_processor(folder, **options)
    ours = vlmkit.AutoProcessor.from_pretrained(folder, **options)
    assert_same_features(ours(text=PROMPTS[fixture], images=image, return_tensors="pt"),
                         reference(text=PROMPTS[fixture], images=image, return_tensors="pt"))


@pytest.mark.parametrize("options", [dict(image_size=48), dict(image_mean=[0.1, 0.2, 0.3], do_normalize=False),
                                     dict(image_std=0.3), dict(size={"height": 20, "width": 28}),
                                     dict(size={"height": 20, "width": 20}, image_size=40)])
def test_idefics_settings_given_at_load_match_transformers(idefics_resampler_dir, options, image):
    reference = reference_processor(idefics_resampler_dir, **options)
    ours = vlmkit.AutoProcessor.from_pretrained(idefics_resampler_dir, **options)
    # a size given at load reaches each call in transformers, over image_size (its processor's default_image_dims
    # keep image_size, so a prompt without images cannot be batched with them there)
    prompts = [["User:", image, "What?"], ["User:", image]] if "size" in options else \
        [["User:", image, "What?"], ["User: text only"]]
    assert_same_features(ours(text=prompts, return_tensors="pt"), reference(text=prompts, return_tensors="pt"))


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def test_auto_image_processor_takes_settings_given_at_load(fixture, request, image):
    folder = request.getfixturevalue(fixture)
    options = dict(image_mean=[0.1, 0.2, 0.3], do_resize=False)
    ours = vlmkit.AutoImageProcessor.from_pretrained(folder, **options)([image], return_tensors="pt")
    theirs = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil", **options)([image],
                                                                                                    return_tensors="pt")
    ours, theirs = (p if isinstance(p, torch.Tensor) else p["pixel_values"] for p in (ours, theirs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("fixture,options", [
    *((f, o) for f in ("janus_dir", "llava_onevision_dir", "idefics_resampler_dir")
      for o in (dict(pad_token="<x>", bos_token="<y>"), dict(pad_token="eos"))),
    # not IDEFICS: its config lists extra_special_tokens, which transformers 5 reads over additional_special_tokens
    ("janus_dir", dict(additional_special_tokens=["<z>"], padding_side="left")),
    ("llava_onevision_dir", dict(additional_special_tokens=["<z>"], padding_side="left")),
])
def test_auto_tokenizer_takes_special_tokens_given_at_load(fixture, options, request):
    folder = request.getfixturevalue(fixture)
    if options.get("pad_token") == "eos":  # the checkpoint's own end-of-sequence token as padding
        options = dict(pad_token=transformers.AutoTokenizer.from_pretrained(str(folder)).eos_token)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder), **options)
    ours = vlmkit.AutoTokenizer.from_pretrained(folder, **options)
    texts = ["a <x> b <y> c <z>", "a"]
    assert (ours.pad_token, ours.pad_token_id, ours.bos_token, len(ours)) == \
        (reference.pad_token, reference.pad_token_id, reference.bos_token, len(reference))
    assert ours(texts, padding=True)["input_ids"] == reference(texts, padding=True)["input_ids"]
    assert sorted(ours.all_special_tokens) == sorted(reference.all_special_tokens)


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir"])
def test_chat_template_given_at_load_renders_as_transformers(fixture, request):
    folder = request.getfixturevalue(fixture)
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reference = reference_processor(folder, chat_template=TEMPLATE)
    ours = vlmkit.AutoProcessor.from_pretrained(folder, chat_template=TEMPLATE)
    want = reference.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == want == "[user]<go>"
    assert ours.tokenizer.chat_template == reference.tokenizer.chat_template == TEMPLATE


def test_idefics_chat_template_given_at_load_is_the_tokenizers_as_in_transformers(idefics_resampler_dir):
    messages = [{"role": "user", "content": "hi"}]
    reference = transformers.AutoTokenizer.from_pretrained(str(idefics_resampler_dir), chat_template=TEMPLATE)
    ours = vlmkit.AutoProcessor.from_pretrained(idefics_resampler_dir, chat_template=TEMPLATE)
    want = reference.apply_chat_template(messages, tokenize=False)
    assert ours.tokenizer.apply_chat_template(messages, tokenize=False) == want
    assert ours.apply_chat_template(messages) == want  # vlmkit's IDEFICS processor renders it too


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def test_a_setting_nothing_reads_is_kept_by_the_tokenizer_with_a_warning(fixture, request):
    # transformers keeps it silently in the tokenizer's init_kwargs; vlmkit keeps it and says it changes nothing
    folder = request.getfixturevalue(fixture)
    with pytest.warns(UserWarning, match="no_such_setting"):
        ours = vlmkit.AutoProcessor.from_pretrained(folder, no_such_setting=1)
    reference = reference_processor(folder, no_such_setting=1)
    assert ours.tokenizer.config["no_such_setting"] == reference.tokenizer.init_kwargs["no_such_setting"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlmkit.AutoProcessor.from_pretrained(folder, backend="pil", use_fast=True)  # transformers' choices: silent


@pytest.mark.parametrize("fixture,edits", [
    ("janus_dir", {"use_default_system_prompt": True, "image_processor.image_mean": [0.1, 0.2, 0.3],
                   "image_processor.do_normalize": False}),
    ("llava_onevision_dir", {"image_processor.image_std": [0.2, 0.3, 0.4], "image_processor.rescale_factor": 0.5})])
def test_settings_edited_after_loading_are_saved_as_transformers_saves_them(fixture, edits, request, image, tmp_path):
    """``processor.image_processor.image_mean = ...; processor.save_pretrained(folder)``: transformers and vlmkit
    load the edited settings back from the saved files, and their processors then agree."""
    folder = request.getfixturevalue(fixture)
    ours = vlmkit.AutoProcessor.from_pretrained(folder)
    for name, value in edits.items():
        owner, _, attribute = name.rpartition(".")
        setattr(getattr(ours, owner) if owner else ours, attribute, value)
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())  # as beside a saved model
    reference, reloaded = reference_processor(tmp_path), vlmkit.AutoProcessor.from_pretrained(tmp_path)
    for name, value in edits.items():
        owner, _, attribute = name.rpartition(".")
        for processor in (reference, reloaded):
            saved = getattr(getattr(processor, owner) if owner else processor, attribute)
            assert list(saved) == value if isinstance(value, list) else saved == value, (name, processor)
    prompt = PROMPTS[fixture]
    assert_same_features(reloaded(text=prompt, images=image, return_tensors="pt"),
                         reference(text=prompt, images=image, return_tensors="pt"))
