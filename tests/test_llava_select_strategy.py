"""LLaVA-OneVision with vision_feature_select_strategy "default": transformers drops each tower input's first
feature; that runs for the untiled images of multi-image prompts and fails for a single image's anyres tiles.
vlmkit loads such checkpoints, matches transformers where it runs, and says why where it does not."""

import json
import shutil

import pytest
import torch

from vlmkit import InputError


@pytest.fixture(scope="module")
def default_strategy_dir(llava_onevision_dir, tmp_path_factory):
    folder = shutil.copytree(llava_onevision_dir, tmp_path_factory.mktemp("onevision_default") / "ckpt")
    for name in ("config.json", "processor_config.json"):
        values = json.loads((folder / name).read_text())
        values["vision_feature_select_strategy"] = "default"
        (folder / name).write_text(json.dumps(values))
    return folder


@pytest.fixture(scope="module")
def both(default_strategy_dir):
    from builders.llava_onevision import reference_processor
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    from vlmkit.models.llava_onevision import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    reference = (reference_processor(default_strategy_dir),
                 Reference.from_pretrained(default_strategy_dir, dtype=torch.float32).eval())
    ours = (LlavaOnevisionProcessor.from_pretrained(default_strategy_dir),
            LlavaOnevisionForConditionalGeneration.from_pretrained(default_strategy_dir, dtype=torch.float32))
    return reference, ours


def _chat(processor, *images):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": "Compare."}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")


def test_multi_image_prompts_match_transformers(both, sample_images):
    (ref_processor, ref_model), (processor, model) = both
    expected_inputs = _chat(ref_processor, sample_images["wide"], sample_images["tall"])
    inputs = _chat(processor, sample_images["wide"], sample_images["tall"])
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    with torch.no_grad():
        expected = ref_model(**expected_inputs).logits
        torch.testing.assert_close(model(**expected_inputs).logits, expected, rtol=1e-4, atol=1e-4)
        expected_tokens = ref_model.generate(**expected_inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), expected_tokens)


def test_a_single_tiled_image_is_refused_where_transformers_fails(both, sample_images):
    (ref_processor, ref_model), (processor, model) = both
    with pytest.raises(ValueError, match="number of patches is not consistent"), torch.no_grad():
        ref_model(**_chat(ref_processor, sample_images["square"]))
    with pytest.raises(InputError, match="'default'.*prompts of two or more images"):
        model.generate(**_chat(processor, sample_images["square"]), max_new_tokens=2)


def test_video_frames_are_refused(both):
    _, (_, model) = both
    size = model.config.vision_config.image_size
    with pytest.raises(InputError, match="video frames"):
        model.get_video_features(torch.zeros(1, 2, 3, size, size))
