"""A damaged or inconsistent checkpoint, or a from_pretrained option vlmkit cannot honour, is refused at load
with a vlmkit error naming the file, the key or tensor, and the fix; never a traceback from deep inside, and
never a refusal of a real checkpoint's shapes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit import AutoConfig, AutoModel, AutoProcessor, CheckpointError, InputError
from vlmkit.models.devices import resolve_device
from vlmkit.models.idefics.config import IdeficsConfig
from vlmkit.models.janus.config import JanusConfig
from vlmkit.models.llava_onevision.config import LlavaOnevisionConfig

_FIXTURES = {"janus": "janus_dir", "llava_onevision": "llava_onevision_dir", "idefics": "idefics_resampler_dir"}


def _copy(source, tmp_path):
    return shutil.copytree(source, tmp_path / "ckpt")


def _edit_json(folder, name, edit):
    path = folder / name
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))
    return folder


def _set(path: str, value):
    """An edit that sets config["a"]["b"] for path "a.b"."""
    def edit(config):
        *parents, last = path.split(".")
        for key in parents:
            config = config[key]
        config[last] = value
    return edit


# --- config.json and generation_config.json of the wrong kind ---------------------------------------------

def test_config_json_holding_a_list_is_refused_naming_the_file(janus_dir, tmp_path):
    folder = _copy(janus_dir, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a list, not a JSON object"):
        AutoModel.from_pretrained(folder)


def test_config_json_that_is_a_folder_is_refused_naming_it(janus_dir, tmp_path):
    folder = _copy(janus_dir, tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is a folder, not a file"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize(("family", "key", "value", "expected"), [
    ("janus", "text_config.hidden_size", "64", "must be an integer"),
    ("janus", "vision_config.layer_norm_eps", "tiny", "must be a number"),
    ("janus", "vq_config.channel_multiplier", ["1", 2], "must be a list of integers"),
    ("janus", "image_token_id", 3.5, "must be an integer"),
    ("janus", "vision_config", [1, 2], "must be a JSON object"),
    ("janus", "text_config", "llama", "must be a JSON object"),
    ("llava_onevision", "vision_config.image_size", "384", "must be an integer"),
    ("llava_onevision", "vision_feature_layer", "last", "must be an integer or a list of integers"),
    ("llava_onevision", "text_config.num_key_value_heads", True, "must be an integer"),
    ("idefics", "hidden_size", [64], "must be an integer"),
    ("idefics", "perceiver_config.resampler_n_latents", 1.5, "must be an integer"),
    ("idefics", "use_resampler", "yes", "must be true or false"),
])
def test_a_config_value_of_the_wrong_json_type_is_refused_naming_its_key(family, key, value, expected, request,
                                                                        tmp_path):
    folder = _edit_json(_copy(request.getfixturevalue(_FIXTURES[family]), tmp_path), "config.json", _set(key, value))
    with pytest.raises(CheckpointError) as caught:
        AutoModel.from_pretrained(folder)
    assert f"config.json: {key}" in str(caught.value) and expected in str(caught.value)


def test_a_wrongly_typed_size_in_the_original_janus_layout_is_refused_naming_its_key(janus_original_dir, tmp_path):
    folder = _edit_json(_copy(janus_original_dir, tmp_path), "config.json",
                        _set("aligner_config.params.n_embed", "64"))
    with pytest.raises(CheckpointError, match=r"config\.json: aligner_config\.params\.n_embed is a string"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize(("settings", "named"), [
    ({"eos_token_id": "x"}, "eos_token_id is a string"),
    ({"temperature": "hot"}, "temperature is a string"),
    ({"max_new_tokens": -3}, "max_new_tokens must be at least 1"),
])
def test_a_bad_generation_config_json_is_refused_at_load_naming_the_file_and_key(settings, named, janus_dir,
                                                                                 tmp_path):
    folder = _copy(janus_dir, tmp_path)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError) as caught:
        AutoModel.from_pretrained(folder)
    assert "generation_config.json" in str(caught.value) and named in str(caught.value)


# --- tokenizer and weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["{oops", ""])
def test_a_corrupt_or_empty_tokenizer_json_is_refused_naming_the_file(content, janus_dir, tmp_path):
    folder = _copy(janus_dir, tmp_path)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json cannot be read by the tokenizers library"):
        AutoProcessor.from_pretrained(folder)


def test_weights_stored_in_an_integer_dtype_are_refused_naming_the_tensor(janus_dir, tmp_path):
    folder = _copy(janus_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    name = next(n for n in sorted(state) if n.endswith("layers.0.mlp.up_proj.weight"))
    state[name] = state[name].to(torch.int32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} is stored as int32"):
        AutoModel.from_pretrained(folder, dtype=torch.float32)


# --- device_map and dtype ----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["balanced", "sequential", "balanced_low_0", {"": "auto"}])
def test_transformers_spreading_strategies_place_the_model_where_auto_does(strategy):
    assert resolve_device(strategy) == resolve_device("auto")


def test_a_spreading_strategy_loads_the_model(janus_dir):
    model = AutoModel.from_pretrained(janus_dir, device_map="balanced", dtype=torch.float32)
    assert model.device == resolve_device("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device_map", [0, {"": 0}, "cuda:0", {"": "cuda"}])
def test_a_cuda_device_map_without_cuda_is_refused_saying_so(device_map):
    with pytest.raises(InputError, match=r"device_map=.* torch sees no CUDA device here; pass device_map='cpu'"):
        resolve_device(device_map)


@pytest.mark.parametrize("device_map", ["meta", "disk", "balanced_low_1", {"": "disk"}, -1, 1.5, True])
def test_a_device_map_vlmkit_cannot_load_onto_is_refused_naming_the_values_it_takes(device_map):
    with pytest.raises(InputError, match=r"device_map=.* is not a device vlmkit can load onto; it takes 'auto'"):
        resolve_device(device_map)


def test_device_map_meta_is_refused_before_loading(janus_dir):
    with pytest.raises(InputError, match="device_map='meta'"):
        AutoModel.from_pretrained(janus_dir, device_map="meta")


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.float8_e4m3fn, "float99", 16])
def test_a_dtype_no_model_computes_in_is_refused_naming_the_option(dtype, janus_dir):
    with pytest.raises(InputError, match=r"dtype=.* use 'auto', torch\.float32"):
        AutoModel.from_pretrained(janus_dir, dtype=dtype)


@pytest.mark.parametrize("name", ["torch.bfloat16", "bfloat16", "bf16"])
def test_dtype_names_with_or_without_torch_prefix_load(name, janus_dir):
    assert AutoModel.from_pretrained(janus_dir, dtype=name).dtype == torch.bfloat16


def test_a_config_dtype_that_names_no_dtype_is_refused_with_auto(janus_dir, tmp_path):
    folder = _edit_json(_copy(janus_dir, tmp_path), "config.json", _set("dtype", "float99"))
    with pytest.raises(CheckpointError, match=r"config\.json: dtype is 'float99', which names no torch dtype"):
        AutoModel.from_pretrained(folder)


# --- sizes that do not meet across sections ----------------------------------------------------------

@pytest.mark.parametrize("key", ["vision_config.projection_dim", "vq_config.projection_dim",
                                 "vq_config.image_token_embed_dim"])
def test_a_janus_size_that_does_not_meet_the_text_width_is_refused_naming_both_keys(key, janus_dir, tmp_path):
    folder = _edit_json(_copy(janus_dir, tmp_path), "config.json", _set(key, 48))
    with pytest.raises(CheckpointError) as caught:
        AutoModel.from_pretrained(folder)
    assert f"config.json: {key} is 48 but config.json: text_config.hidden_size is" in str(caught.value)


def test_a_self_consistent_janus_checkpoint_whose_aligner_misses_the_text_width_is_refused(janus_dir, tmp_path):
    """The probe's case: transformers builds (and saves) such a model; its first prompt fails on a shape."""
    from transformers import JanusConfig as ReferenceConfig, JanusForConditionalGeneration as Reference

    folder = _copy(janus_dir, tmp_path)
    values = json.loads((folder / "config.json").read_text())
    values["text_config"].update(hidden_size=40, head_dim=10)
    torch.manual_seed(0)
    reference = Reference(ReferenceConfig(**{k: v for k, v in values.items()
                                             if k not in ("architectures", "transformers_version", "model_type")}))
    (folder / "model.safetensors").unlink()
    reference.save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"vision_config\.projection_dim is \d+ but config\.json: "
                                              r"text_config\.hidden_size is 40"):
        AutoModel.from_pretrained(folder)


def test_an_original_layout_aligner_that_misses_the_text_width_is_refused_in_its_own_key_names(janus_original_dir,
                                                                                              tmp_path):
    folder = _edit_json(_copy(janus_original_dir, tmp_path), "config.json", _set("aligner_config.params.n_embed", 48))
    with pytest.raises(CheckpointError, match=r"aligner_config\.params\.n_embed is 48 but config\.json: "
                                              r"language_config\.hidden_size"):
        AutoModel.from_pretrained(folder)


def test_reading_an_inconsistent_config_alone_is_not_refused(janus_dir, tmp_path):
    """As transformers' AutoConfig: only building the model needs the sections to meet."""
    folder = _edit_json(_copy(janus_dir, tmp_path), "config.json", _set("vision_config.projection_dim", 48))
    assert AutoConfig.from_pretrained(folder).vision_config.projection_dim == 48


def test_a_llava_onevision_feature_layer_outside_the_tower_is_refused_naming_both_keys(llava_onevision_dir, tmp_path):
    folder = _edit_json(_copy(llava_onevision_dir, tmp_path), "config.json", _set("vision_feature_layer", 40))
    with pytest.raises(CheckpointError, match=r"vision_feature_layer 40 .* vision_config\.num_hidden_layers"):
        AutoModel.from_pretrained(folder)


def test_an_idefics_width_its_heads_do_not_divide_is_refused_naming_both_keys(idefics_resampler_dir, tmp_path):
    folder = _edit_json(_copy(idefics_resampler_dir, tmp_path), "config.json", _set("vision_config.num_attention_heads", 5))
    with pytest.raises(CheckpointError, match=r"vision_config\.embed_dim \(\d+\) is not a multiple of "
                                              r"vision_config\.num_attention_heads \(5\)"):
        AutoModel.from_pretrained(folder)


def test_query_heads_the_key_value_heads_do_not_divide_are_refused(llava_onevision_dir, tmp_path):
    folder = _edit_json(_copy(llava_onevision_dir, tmp_path), "config.json",
                        _set("text_config.num_key_value_heads", 3))
    with pytest.raises(CheckpointError, match=r"text_config\.num_attention_heads \(\d+\) is not a multiple of "
                                              r"config\.json: text_config\.num_key_value_heads \(3\)"):
        AutoModel.from_pretrained(folder)


# --- real checkpoints' configs, as transformers writes them, pass every check ------------------------

def _janus_pro(hidden, intermediate, layers, heads):
    from transformers import JanusConfig as Reference
    return Reference(text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=102400,
                                      max_position_embeddings=16384),
                     vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        image_size=384, patch_size=16, projection_dim=hidden),
                     vq_config=dict(projection_dim=hidden, image_token_embed_dim=hidden)).to_dict()


def _onevision(hidden, intermediate, layers, heads, kv_heads):
    from transformers import LlavaOnevisionConfig as Reference
    return Reference(text_config=dict(model_type="qwen2", hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, vocab_size=152000),
                     vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                        num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                                        vision_use_head=False),
                     vision_feature_layer=-1, vision_feature_select_strategy="full").to_dict()


def _idefics_9b():
    from transformers import IdeficsConfig as Reference
    return Reference(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000, additional_vocab_size=2, cross_layer_interval=4, use_resampler=True,
                     vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14,
                                        num_hidden_layers=32, num_attention_heads=16),
                     perceiver_config=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                                           resampler_head_dim=96)).to_dict()


@pytest.mark.parametrize(("config_class", "build"), [
    (JanusConfig, lambda: _janus_pro(2048, 5632, 24, 16)),     # Janus-Pro-1B
    (JanusConfig, lambda: _janus_pro(4096, 11008, 30, 32)),    # Janus-Pro-7B
    (LlavaOnevisionConfig, lambda: _onevision(896, 4864, 24, 14, 2)),     # llava-onevision-qwen2-0.5b
    (LlavaOnevisionConfig, lambda: _onevision(3584, 18944, 28, 28, 4)),   # llava-onevision-qwen2-7b
    (IdeficsConfig, _idefics_9b),                                         # idefics-9b
], ids=["janus-pro-1b", "janus-pro-7b", "onevision-0.5b", "onevision-7b", "idefics-9b"])
def test_real_checkpoint_configs_as_transformers_writes_them_pass_every_check(config_class, build):
    values = json.loads(json.dumps(build(), default=str))  # what config.json holds
    config = config_class.from_dict(values)
    config.check_sizes()
