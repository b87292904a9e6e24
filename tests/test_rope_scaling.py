"""Rotary scaling (nn/rotary.py) against transformers' modeling_rope_utils: the same inverse frequencies and
attention factor for every rope type vlmkit computes, the same logits through a decoder whose KV cache grows
past max_position_embeddings (dynamic NTK recomputes its frequencies there), the same model loaded from a
checkpoint, and a clear error for the rope types vlmkit does not compute."""

import json
import shutil

import pytest
import torch

from vlmkit import AutoModel, CheckpointError, InputError
from vlmkit.nn.decoder import DecoderConfig, DecoderModel

LIMIT = 16  # max_position_embeddings of the tiny decoders

ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn, no original length": {"rope_type": "yarn", "factor": 2.0},
    "yarn, attention factor, betas": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4,
                                      "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2},
    "yarn, mscales, untruncated": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 8,
                                   "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic, odd factor": {"rope_type": "dynamic", "factor": 1.7},
}


def _text_config(rope: dict, legacy: bool = False) -> dict:
    """A tiny Qwen2 text config; ``legacy``: transformers 4's ``rope_scaling`` with ``type`` and ``rope_theta``."""
    config = dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LIMIT, rms_norm_eps=1e-6)
    if legacy:
        scaling = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
        return {**config, "rope_theta": 5000.0, "rope_scaling": scaling}
    return {**config, "rope_parameters": {"rope_theta": 5000.0, **rope}}


def _models(rope: dict, legacy: bool = False):
    """(transformers' Qwen2ForCausalLM, vlmkit's DecoderModel with the same weights, its LM head weight)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    values = _text_config(rope, legacy)
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(Qwen2Config(**values)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.3)
    ours = DecoderModel(DecoderConfig.from_text_config(values, "qwen2")).eval()
    ours.load_state_dict(reference.model.state_dict())
    return reference, ours, reference.lm_head.weight


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("name", list(ROPES))
def test_inverse_frequencies_and_attention_factor_match_transformers(name, legacy):
    reference, ours, _ = _models(ROPES[name], legacy)
    assert torch.equal(ours.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert ours.rotary_emb.attention_scaling == reference.model.rotary_emb.attention_scaling


def _greedy(ours, head, prompt, steps):
    """Prefill ``prompt`` [1, T] into a KV cache, then ``steps`` greedy decode steps; each step's logits."""
    cache = ours.new_cache(1, prompt.shape[1] + steps)
    positions = torch.arange(prompt.shape[1])[None]
    logits = [ours(ours.embed_tokens(prompt), positions, None, cache)[:, -1] @ head.T]
    for _ in range(steps - 1):
        token = logits[-1].argmax(-1, keepdim=True)
        step = ours(ours.embed_tokens(token), torch.tensor([[cache.length]]), None, cache)
        logits.append(step[:, -1] @ head.T)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("name", ["yarn", "dynamic", "dynamic, odd factor", "default"])
def test_greedy_decoding_past_max_position_embeddings_matches_transformers_step_by_step(name):
    """Prompts shorter and longer than the limit, decoded past it: dynamic NTK recomputes its frequencies at
    every step that lengthens the sequence (the cached keys keep theirs); a later prompt past the limit but
    shorter than the longest sequence so far keeps that sequence's frequencies, and one below the limit goes
    back to the original ones, in both."""
    reference, ours, head = _models(ROPES[name])
    prompts = torch.randint(0, 96, (4, LIMIT + 5), generator=torch.Generator().manual_seed(1))
    for prompt in (prompts[0, :LIMIT - 4], prompts[1], prompts[2, :LIMIT + 2], prompts[3, :6]):
        prompt = prompt[None]
        with torch.no_grad():
            expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=0)
            logits = _greedy(ours, head, prompt, 10)
        torch.testing.assert_close(logits, torch.stack(expected.logits, 1), rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), expected.sequences[:, prompt.shape[1]:])


def test_dynamic_is_the_default_rotary_below_the_limit():
    _, dynamic, _ = _models(ROPES["dynamic"])
    _, default, _ = _models(ROPES["default"])
    positions = torch.arange(LIMIT)[None]
    for a, b in zip(dynamic.rotary_emb(positions, torch.float32), default.rotary_emb(positions, torch.float32)):
        assert torch.equal(a, b)


def _with_rope(folder, out, rope):
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"].pop("rope_theta", None)
    config["text_config"]["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("name", ["yarn", "dynamic"])
def test_a_checkpoint_with_scaled_rope_loads_and_matches_transformers(llava_onevision_dir, tmp_path, name):
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    folder = _with_rope(llava_onevision_dir, tmp_path / name, ROPES[name])
    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    input_ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.generate(input_ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(input_ids, max_new_tokens=6, do_sample=False), expected.sequences)


@pytest.mark.parametrize("name, context", [("default", LIMIT), ("linear", 2 * LIMIT), ("dynamic", 2 * LIMIT),
                                           ("dynamic, odd factor", int(1.7 * LIMIT)), ("yarn", 4 * 8),
                                           ("yarn, no original length", 2 * LIMIT), ("llama3", LIMIT)])
def test_the_context_is_what_the_rope_scaling_stretches_max_position_embeddings_to(name, context):
    assert DecoderConfig.from_text_config(_text_config(ROPES[name]), "qwen2").context_length == context


@pytest.mark.parametrize("name", ["yarn", "dynamic"])
def test_generate_runs_past_max_position_embeddings_where_the_rope_is_scaled_for_it(llava_onevision_dir, tmp_path,
                                                                                   name):
    """max_position_embeddings 32 with YaRN (original length 8, factor 8: 64 positions) or dynamic NTK (factor
    2: 64): a 40-token prompt and 16 new tokens run, token for token as transformers; without scaling the same
    request is refused before any work, naming the context."""
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8} if name == "yarn" \
        else {"rope_type": "dynamic", "factor": 2.0}
    folders = {}
    for variant, variant_rope in (("scaled", rope), ("plain", {"rope_type": "default"})):
        folders[variant] = _with_rope(llava_onevision_dir, tmp_path / variant, variant_rope)
        config = json.loads((folders[variant] / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = 32
        (folders[variant] / "config.json").write_text(json.dumps(config))
    reference = Reference.from_pretrained(folders["scaled"], dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(folders["scaled"], dtype=torch.float32)
    assert model.max_context == 64
    input_ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.generate(input_ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(input_ids, max_new_tokens=16, do_sample=False), expected)
    plain = AutoModel.from_pretrained(folders["plain"], dtype=torch.float32)
    with pytest.raises(InputError, match="context of 32 tokens"):
        plain.generate(input_ids, max_new_tokens=16, do_sample=False)


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
                                  {"type": "su"}])
def test_a_rope_type_vlmkit_does_not_compute_is_a_checkpoint_error_at_load(llava_onevision_dir, tmp_path, rope):
    folder = _with_rope(llava_onevision_dir, tmp_path / "unsupported", rope)
    rope_type = rope.get("rope_type", rope.get("type"))
    with pytest.raises(CheckpointError, match=f"rope type '{rope_type}'.*not supported.*'yarn', 'dynamic'"):
        AutoModel.from_pretrained(folder)


def test_a_scaled_rope_missing_its_factor_is_named():
    with pytest.raises(CheckpointError, match="'dynamic' needs 'factor'"):
        DecoderConfig.from_text_config(_text_config({"rope_type": "dynamic"}), "qwen2").rope


@pytest.mark.parametrize("text_config,named", [
    ({"rope_theta": "10000"}, "rope_theta"), ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                          "beta_fast": "32"}}, "beta_fast")])
def test_rope_settings_of_the_wrong_type_are_refused_naming_the_key(text_config, named):
    from vlmkit.nn.rotary import rope_settings

    with pytest.raises(CheckpointError, match=named):
        rope_settings({"max_position_embeddings": 128, **text_config})
