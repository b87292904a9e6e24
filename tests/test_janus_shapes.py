"""Other Janus shapes than the default fixture: MHA, another image/patch size, other VQ depths."""

import pytest
import torch
from builders.janus import build_tiny_janus
from janus_reference import chat_inputs, ours, reference

SHAPES = {
    "mha, 48px images, patch 16": dict(num_key_value_heads=4, image_size=48, patch_size=16, seed=1),
    "one kv head, three VQ levels": dict(num_key_value_heads=1, channel_multiplier=(1, 1, 2), seed=2,
                                         text_num_layers=3, vision_num_layers=1),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    return build_tiny_janus(tmp_path_factory.mktemp("janus_shape"), **SHAPES[request.param])


def test_other_shapes_match_reference_for_understanding_and_generation(checkpoint, sample_images):
    ref_processor, ref_model = reference(str(checkpoint))
    processor, model = ours(str(checkpoint))
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_images["tall"]},
                                             {"type": "text", "text": "What is this?"}]}]
    expected_inputs, inputs = chat_inputs(ref_processor, messages), chat_inputs(processor, messages)
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    assert torch.allclose(inputs["pixel_values"], expected_inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, ref_model(**expected_inputs).logits, atol=1e-4, rtol=0)
    assert model.generate(**inputs, max_new_tokens=16).tolist() == \
        ref_model.generate(**expected_inputs, max_new_tokens=16, do_sample=False).tolist()
    prompt = ref_processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "A cat."}]}],
                                               add_generation_prompt=True)
    expected = ref_model.generate(**ref_processor(text=prompt, generation_mode="image", return_tensors="pt"),
                                  generation_mode="image", do_sample=False)
    got = model.generate(**processor(text=prompt, generation_mode="image"), generation_mode="image", do_sample=False)
    assert got.tolist() == expected.tolist()
    with torch.no_grad():
        assert torch.allclose(model.decode_image_tokens(got), ref_model.decode_image_tokens(expected), atol=1e-4)
