"""Config values and checkpoint contents the other tests' tiny checkpoints do not have, as transformers' config
classes accept them and its models honour (or ignore) them: each variant is built by transformers from an edited
config.json, and vlmkit's fp32 logits and greedy tokens must be transformers'. Where transformers cannot run a
config either, vlmkit refuses it at load, naming the key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders.idefics import _randomize_ as randomize_idefics
from builders.variants import build_variant
from vlmkit import AutoModel, CheckpointError

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)

NEW_TOKENS = 8


def _reference(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder, dtype=torch.float32).eval()


def _assert_same_logits_and_tokens(folder, inputs, generate: bool = True):
    reference, model = _reference(folder), AutoModel.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-4)
        if generate:
            expected_ids = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == \
                expected_ids.tolist()


def _idefics_inputs(folder, images):
    processor = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    return dict(processor(text=[["User:", images["square"], "What is in it?", images["wide"], "And here?\nAssistant:"],
                                ["User:", images["tall"], "Hi\nAssistant:"]]))


def _llava_inputs(folder, images):
    from builders.llava_onevision import reference_processor

    messages = [{"role": "user", "content": [{"type": "image", "image": images["wide"]},
                                             {"type": "text", "text": "What is shown?"}]}]
    return dict(reference_processor(folder).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=True, return_tensors="pt"))


def _janus_inputs(folder, images):
    from janus_reference import chat_inputs

    messages = [{"role": "user", "content": [{"type": "image", "image": images["tall"]},
                                             {"type": "text", "text": "What is this?"}]}]
    return dict(chat_inputs(transformers.JanusProcessor.from_pretrained(str(folder), backend="pil"), messages))


# --- IDEFICS: LLaMA keys its decoder does not read -------------------------------------------------------------

@pytest.fixture(scope="module")
def idefics_with_unread_llama_keys(idefics_plain_dir, tmp_path_factory):
    """IDEFICS whose flat config.json also holds LLaMA keys (as a config converted from a LLaMA one may):
    transformers' IDEFICS attention has no key/value grouping and no biases whatever they say."""
    def edit(config):
        config.update(num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                      head_dim=config["hidden_size"] // config["num_attention_heads"])
    return build_variant(idefics_plain_dir, tmp_path_factory.mktemp("idefics_llama_keys"), edit, seed=3,
                         randomize=randomize_idefics)


def test_idefics_ignores_the_llama_keys_its_attention_does_not_read_as_transformers(idefics_with_unread_llama_keys,
                                                                                    sample_images):
    folder = idefics_with_unread_llama_keys
    _assert_same_logits_and_tokens(folder, _idefics_inputs(folder, sample_images))
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert model.config.to_dict()["num_key_value_heads"] == 2  # kept in the config, written back when saved


def test_an_idefics_head_dim_other_than_the_heads_width_is_refused_naming_it(idefics_plain_dir, tmp_path,
                                                                            sample_images):
    folder = shutil.copytree(idefics_plain_dir, tmp_path / "head_dim")
    config = json.loads((folder / "config.json").read_text())
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"] // 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():  # transformers fails at its rotary
        _reference(folder)(**_idefics_inputs(folder, sample_images))
    with pytest.raises(CheckpointError, match=rf"config\.json: head_dim is {config['head_dim']}.*remove head_dim"):
        AutoModel.from_pretrained(folder)


# --- tensors the model does not use ------------------------------------------------------------------------------

_FAMILY_DIRS = {"janus": "janus_dir", "llava_onevision": "llava_onevision_dir", "idefics": "idefics_plain_dir"}
_FAMILY_INPUTS = {"janus": _janus_inputs, "llava_onevision": _llava_inputs, "idefics": _idefics_inputs}


def _with_extra_tensors(source, folder, drop: str | None = None):
    """A copy of ``source`` whose weights also hold a saved rotary ``inv_freq`` (as LLaMA checkpoints of
    transformers 4.30 and older have) and a tensor of no module at all; ``drop``: a tensor to leave out."""
    folder = shutil.copytree(source, folder)
    state = load_file(str(folder / "model.safetensors"))
    query = next(k for k in sorted(state) if k.endswith("layers.0.self_attn.q_proj.weight") and "vision" not in k)
    state[query.replace("q_proj.weight", "rotary_emb.inv_freq")] = torch.ones(8)
    state["extra_head.weight"] = torch.ones(3, 2)
    if drop:
        state.pop(next(k for k in state if k.endswith(drop)))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("family", list(_FAMILY_DIRS))
@pytest.mark.filterwarnings("ignore:.*checkpoint tensor.*were skipped")  # the second load's, the first is checked
def test_checkpoint_tensors_the_model_does_not_use_are_skipped_as_transformers_skips_them(family, request, tmp_path,
                                                                                        sample_images):
    folder = _with_extra_tensors(request.getfixturevalue(_FAMILY_DIRS[family]), tmp_path / family)
    with pytest.warns(UserWarning, match=r"2 checkpoint tensor\(s\) this model does not use were skipped") as warned:
        _, info = AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert "extra_head.weight" in str(warned[0].message) and "rotary_emb.inv_freq" in str(warned[0].message)
    assert len(info["unexpected_keys"]) == 2
    _assert_same_logits_and_tokens(folder, _FAMILY_INPUTS[family](folder, sample_images), generate=False)


def test_unused_tensors_are_still_named_when_a_needed_one_is_missing(janus_dir, tmp_path):
    folder = _with_extra_tensors(janus_dir, tmp_path / "broken", drop="language_model.norm.weight")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.language_model\.norm\.weight.*"
                                              r"unexpected tensors: .*extra_head\.weight"):
        AutoModel.from_pretrained(folder)


# --- variations vlmkit already runs as transformers (kept from breaking) -----------------------------------------

_LLAVA_VARIANTS = {
    # an int feature layer inside the tower, a projector without biases and another activation, one key/value
    # head, a head_dim other than hidden/heads, anyres_max_4
    "layer -2, bare silu projector, 1 kv head, head_dim 32": lambda c: (
        c.update(vision_feature_layer=-2, multimodal_projector_bias=False, projector_hidden_act="silu",
                 vision_aspect_ratio="anyres_max_4"),
        c["text_config"].update(num_key_value_heads=1, head_dim=32),
        c["vision_config"].update(layer_norm_eps=1e-5, hidden_act="gelu")),
    # a LLaMA text model (any text config transformers' class takes) with biased attention
    "llama text config": lambda c: (
        c["text_config"].update(model_type="llama", attention_bias=True, num_key_value_heads=4),
        [c["text_config"].pop(k, None) for k in ("layer_types", "use_sliding_window", "sliding_window",
                                                  "max_window_layers")]),
}
_JANUS_VARIANTS = {
    "deeper aligners, mlp_ratio 2.5, one vq aligner layer, head_dim 32": lambda c: (
        c["vision_config"].update(depth=3, mlp_ratio=2.5, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5),
        c["vq_config"].update(num_hidden_layers=1, hidden_act="silu", embed_dim=16, num_embeddings=128),
        c["text_config"].update(head_dim=32, rope_theta=500000.0, num_key_value_heads=4)),
}
_IDEFICS_VARIANTS = {
    "interval 2, float gates, one-layer perceiver of 3 latents": lambda c: (
        c.update(cross_layer_interval=2, alpha_type="float", qk_layer_norms=True, rms_norm_eps=1e-5),
        c["perceiver_config"].update(resampler_n_latents=3, resampler_depth=1, resampler_n_heads=4,
                                     resampler_head_dim=8, qk_layer_norms_perceiver=False)),
}
_VARIANTS = {**{("llava_onevision", k): v for k, v in _LLAVA_VARIANTS.items()},
             **{("janus", k): v for k, v in _JANUS_VARIANTS.items()},
             **{("idefics_resampler", k): v for k, v in _IDEFICS_VARIANTS.items()}}


@pytest.mark.parametrize("family, variant", list(_VARIANTS), ids=[name for _, name in _VARIANTS])
def test_config_variations_match_transformers(family, variant, request, tmp_path, sample_images):
    source = request.getfixturevalue({"llava_onevision": "llava_onevision_dir", "janus": "janus_dir",
                                      "idefics_resampler": "idefics_resampler_dir"}[family])
    folder = build_variant(source, tmp_path / "variant", _VARIANTS[family, variant], seed=5,
                           randomize=randomize_idefics if family.startswith("idefics") else None)
    inputs = {"llava_onevision": _llava_inputs, "janus": _janus_inputs, "idefics_resampler": _idefics_inputs}[family]
    _assert_same_logits_and_tokens(folder, inputs(folder, sample_images))
