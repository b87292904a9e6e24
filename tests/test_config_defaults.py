"""A config.json that leaves keys out gets, for each of them, the default of the config class transformers
builds that (sub-)config with: Qwen2Config's for LLaVA-OneVision's text side, LlamaConfig's for Janus',
IdeficsConfig's top level, SigLIP's, Janus' and IDEFICS' vision configs... Each case deletes keys from a
tiny checkpoint's config.json and compares every field vlmkit reads with what transformers' AutoConfig
reads from the same file."""

import dataclasses
import json
import shutil

import pytest
import torch

from vlmkit import AutoModel, CheckpointError
from vlmkit.models.idefics.config import IdeficsConfig
from vlmkit.models.janus.config import JanusConfig
from vlmkit.models.llava_onevision.config import LlavaOnevisionConfig

_FIXTURES = {"janus": "janus_dir", "llava_onevision": "llava_onevision_dir", "idefics": "idefics_resampler_dir"}
_CONFIGS = {"janus": JanusConfig, "llava_onevision": LlavaOnevisionConfig, "idefics": IdeficsConfig}
_SUB_CONFIGS = {"janus": ("text_config", "vision_config", "vq_config"),
                "llava_onevision": ("text_config", "vision_config"),
                "idefics": ("vision_config", "perceiver_config")}


def _edited(source, tmp_path, edit):
    folder = shutil.copytree(source, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config


def _keep_only(*keys):
    return lambda values: [values.pop(k) for k in list(values) if k not in keys]


def _cases():
    for family, sub_configs in _SUB_CONFIGS.items():
        for key in sub_configs:
            yield family, f"{key} emptied", lambda c, k=key: _keep_only("model_type")(c[k])
            yield family, f"{key} absent", lambda c, k=key: c.pop(k)
        # the top level's own keys (IDEFICS': its text side too), the sub-configs left as they are
        yield family, "top level emptied", lambda c, s=sub_configs: _keep_only("model_type", *s)(c)
        yield family, "only model_type", _keep_only("model_type")


def _assert_same_fields(ours, reference, where, skip=()):
    """Every field of vlmkit's config dataclass equals the reference config's attribute of that name."""
    for field in dataclasses.fields(ours):
        value = getattr(ours, field.name)
        if (field.name in ("extra", *skip) or dataclasses.is_dataclass(value)
                or not hasattr(reference, field.name)):
            continue
        expected = getattr(reference, field.name)
        if isinstance(expected, tuple):
            expected = list(expected)
        assert value == expected, f"{where}.{field.name}: vlmkit {value!r}, transformers {expected!r}"


def _assert_same_text_config(ours, reference, where):
    # vlmkit keeps None where the reference stores the value it derives: compared as derived below
    _assert_same_fields(ours, reference, where, skip=("num_key_value_heads", "head_dim"))
    assert ours.kv_heads == getattr(reference, "num_key_value_heads", reference.num_attention_heads), where
    assert ours.attention_head_dim == getattr(reference, "head_dim",
                                              reference.hidden_size // reference.num_attention_heads), where
    theta, scaling = ours.rope
    assert theta == reference.rope_parameters["rope_theta"], where
    assert scaling["rope_type"] == reference.rope_parameters["rope_type"], where


@pytest.mark.parametrize(("family", "case", "edit"), list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_keys_left_out_of_config_json_take_the_defaults_transformers_gives_them(family, case, edit, request,
                                                                                 tmp_path):
    from transformers import AutoConfig

    folder, values = _edited(request.getfixturevalue(_FIXTURES[family]), tmp_path, edit)
    ours, reference = _CONFIGS[family].from_dict(values), AutoConfig.from_pretrained(folder)
    _assert_same_fields(ours, reference, family)
    for key in _SUB_CONFIGS[family]:
        if key != "text_config":
            _assert_same_fields(getattr(ours, key), getattr(reference, key), f"{family}.{key}")
    text_reference = reference.text_config if hasattr(reference, "text_config") else reference
    _assert_same_text_config(ours.text_config, text_reference, f"{family}.text_config")


def test_llava_onevision_without_max_position_embeddings_takes_qwen2s_32768(llava_onevision_dir, tmp_path):
    """llava-hf's configs leave out what equals Qwen2Config's defaults; LLaMA's 2048 refused longer prompts."""
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    def edit(config):
        for key in ("max_position_embeddings", "rms_norm_eps", "hidden_act", "use_sliding_window", "sliding_window",
                    "max_window_layers", "attention_dropout", "layer_types", "rope_parameters", "rope_theta"):
            config["text_config"].pop(key, None)
    folder, _ = _edited(llava_onevision_dir, tmp_path, edit)
    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert model.max_context == reference.config.text_config.max_position_embeddings == 32768
    input_ids = torch.randint(0, 500, (1, 2100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "key", "model_type"), [("llava_onevision", "text_config", "mistral"),
                                                          ("janus", "text_config", "qwen3"),
                                                          ("llava_onevision", "vision_config", "clip_vision_model")])
def test_a_sub_config_of_a_model_type_vlmkit_does_not_run_is_refused_by_name(family, key, model_type, request,
                                                                              tmp_path):
    folder, _ = _edited(request.getfixturevalue(_FIXTURES[family]), tmp_path,
                        lambda c: c[key].update(model_type=model_type))
    with pytest.raises(CheckpointError, match=f"{key} model_type '{model_type}' is not supported"):
        AutoModel.from_pretrained(folder)


def _same_logits_as_transformers(folder):
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    input_ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_qwen2_sliding_window_shorter_than_the_context_is_refused_and_a_longer_one_runs(llava_onevision_dir,
                                                                                          tmp_path):
    from vlmkit.nn.decoder import DecoderConfig

    sliding = dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    folder, _ = _edited(llava_onevision_dir, tmp_path, lambda c: c["text_config"].update(
        sliding, layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(CheckpointError, match=r"sliding-window attention \(a window of 16 tokens\)"):
        AutoModel.from_pretrained(folder)
    all_full, _ = _edited(llava_onevision_dir, tmp_path / "full", lambda c: c["text_config"].update(
        sliding, layer_types=["full_attention", "full_attention"]))
    _same_logits_as_transformers(all_full)  # layer_types say no layer slides
    # the same for any family whose text model is Qwen2 (Janus' may be): the check is the decoder config's
    with pytest.raises(CheckpointError, match="sliding-window attention"):
        DecoderConfig.from_text_config(dict(num_hidden_layers=2, **sliding), "qwen2")
    # every layer below max_window_layers, or a window as long as the context: full attention, as transformers
    DecoderConfig.from_text_config(dict(num_hidden_layers=2, **{**sliding, "max_window_layers": 2}), "qwen2")
    long_window, _ = _edited(llava_onevision_dir, tmp_path / "long", lambda c: c["text_config"].update(
        sliding, sliding_window=10 ** 6, layer_types=["sliding_attention", "sliding_attention"]))
    _same_logits_as_transformers(long_window)


def test_qwen2s_mlp_bias_key_is_ignored_as_transformers_ignores_it(llava_onevision_dir, tmp_path):
    folder, _ = _edited(llava_onevision_dir, tmp_path, lambda c: c["text_config"].update(mlp_bias=True))
    _same_logits_as_transformers(folder)
