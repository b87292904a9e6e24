"""Janus checkpoints whose vision config sets ``use_qk_norm``: the tower's queries and keys pass
q_norm/k_norm LayerNorms, as in transformers' JanusVisionAttention. transformers can only run that with one
vision head (its LayerNorm spans hidden_size and is applied to each head's values): vlmkit matches it there,
and says so where transformers fails."""

import pytest
import torch
from janus_reference import chat_inputs, ours, reference

from vlmkit import CheckpointError


def _with_qk_norm(folder, vision_num_heads: int, seed: int):
    """A tiny Janus checkpoint rebuilt by transformers with ``use_qk_norm`` and random q/k norm weights."""
    from builders.janus import _randomize_, build_tiny_janus
    from transformers import AutoConfig, GenerationConfig, JanusForConditionalGeneration

    build_tiny_janus(folder, seed=seed, vision_num_heads=vision_num_heads)
    config = AutoConfig.from_pretrained(folder)
    config.vision_config.use_qk_norm = True
    generation_config = GenerationConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    _randomize_(model, seed)  # the norms' weights and biases too, so they are not the identity
    model.generation_config = generation_config
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def janus_qk_norm_dir(tmp_path_factory):
    return _with_qk_norm(tmp_path_factory.mktemp("janus_qk_norm"), vision_num_heads=1, seed=5)


def _question(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def test_qk_norm_vision_tower_matches_transformers_logits_and_greedy_tokens(janus_qk_norm_dir, sample_images):
    ref_processor, ref_model = reference(str(janus_qk_norm_dir))
    processor, model = ours(str(janus_qk_norm_dir))
    norm = model.model.vision_model.encoder.layers[0].self_attn.q_norm
    assert torch.equal(norm.weight, ref_model.model.vision_model.encoder.layers[0].self_attn.q_norm.weight)
    assert not torch.equal(norm.weight, torch.ones_like(norm.weight))
    inputs = chat_inputs(ref_processor, _question(sample_images["wide"]))
    with torch.no_grad():
        expected = ref_model(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        expected_tokens = ref_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**chat_inputs(processor, _question(sample_images["wide"])),
                                      max_new_tokens=8, do_sample=False), expected_tokens)


def test_qk_norm_with_several_vision_heads_loads_and_refuses_images_as_transformers_fails(tmp_path, sample_images):
    folder = _with_qk_norm(tmp_path / "two_heads", vision_num_heads=2, seed=6)
    ref_processor, ref_model = reference(str(folder))
    processor, model = ours(str(folder))
    inputs = chat_inputs(ref_processor, _question(sample_images["square"]))
    with pytest.raises(RuntimeError, match="normalized_shape"), torch.no_grad():
        ref_model(**inputs)
    with pytest.raises(CheckpointError, match="use_qk_norm with 2 attention heads"):
        model(**inputs)
    text = chat_inputs(processor, [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    with torch.no_grad():
        torch.testing.assert_close(model(**text).logits, ref_model(**text).logits, rtol=1e-4, atol=1e-4)
