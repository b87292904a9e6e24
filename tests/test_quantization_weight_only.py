"""vlmkit's own int8/int4: each family stays close to its unquantized self (no worse than plain
round-to-nearest weights on every linear layer, with 1.5x slack), in bfloat16 on the packed kernels
too; a quantized model saves and loads back quantized without the original weights; Janus draws images
quantized; bad requests fail before any weight is read."""

import functools
import json

import pytest
import torch
from quantization_support import (FAMILIES, FIXTURES, forward_logits, greedy_tokens, image_prompt, relative_rms,
                                  rtn_int4, rtn_int8, vlmkit_class, with_rtn_weights)

from vlmkit.errors import CheckpointError, InputError
from vlmkit.nn.cpu_kernels import int4_kernel_available
from vlmkit.quant import quantized_modules
from vlmkit.quant.weight_only import Int4Linear, Int8Linear, unpack_nibbles

RTN = {"int8": rtn_int8, "int4": rtn_int4}
# where vlmkit's kernels cannot run (VLMKIT_CPU_KERNELS=off, a CPU without AVX2) layers asked for int4 are int8
needs_int4_kernel = pytest.mark.skipif(not int4_kernel_available(),
                                       reason="int4 on a CPU needs vlmkit's kernels (off here): int4 layers are int8")


@functools.lru_cache(maxsize=16)
def load(family: str, folder: str, quantization=None, dtype=torch.float32):
    return vlmkit_class(family).from_pretrained(folder, dtype=dtype, quantization_config=quantization)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_error_is_no_worse_than_round_to_nearest_on_every_linear_layer(request, family, name):
    folder = str(request.getfixturevalue(FIXTURES[family]))
    inputs = image_prompt(family, folder)
    exact = forward_logits(load(family, folder), inputs)
    baseline_model = vlmkit_class(family).from_pretrained(folder, dtype=torch.float32)
    with_rtn_weights(baseline_model, RTN[name])
    baseline = relative_rms(forward_logits(baseline_model, inputs), exact)
    quantized = load(family, folder, name)
    assert quantized_modules(quantized)
    error = relative_rms(forward_logits(quantized, inputs), exact)
    print(f"{family} {name}: error {error:.4f}, round-to-nearest baseline {baseline:.4f}")
    assert error <= 1.5 * baseline
    assert 0 < baseline < 1  # a real error, short of noise (tiny random models are sensitive)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_models_run_the_packed_kernels_and_stay_close(request, family, name):
    folder = str(request.getfixturevalue(FIXTURES[family]))
    inputs = image_prompt(family, folder)
    inputs_bf16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    exact = forward_logits(load(family, folder), inputs)
    model = load(family, folder, name, torch.bfloat16)
    kinds = set(quantized_modules(model).values())
    assert kinds == ({"Int8Linear"} if name == "int8" or not int4_kernel_available() else {"Int8Linear", "Int4Linear"})
    # tiny random models amplify rounding: bfloat16 alone moves their logits by 4-11%
    bf16_error = relative_rms(forward_logits(load(family, folder, None, torch.bfloat16), inputs_bf16), exact)
    quantization_error = relative_rms(forward_logits(load(family, folder, name), inputs), exact)
    assert relative_rms(forward_logits(model, inputs_bf16), exact) <= bf16_error + 1.5 * quantization_error
    assert len(greedy_tokens(model, inputs_bf16, family, 6)) == 6  # decode steps: a few rows, the packed ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_compute_the_product_with_their_dequantized_weight(bits, dtype):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 256), torch.randn(96)
    layer = Int8Linear.from_float(weight, bias, dtype) if bits == 8 else Int4Linear.from_float(weight, 128, bias, dtype)
    dequantized = layer.dequantized_weight()
    rounding = 1e-5 if dtype == torch.float32 else 0.02  # scales (and zero points) kept in the model's dtype
    assert torch.allclose(dequantized, (rtn_int8 if bits == 8 else rtn_int4)(weight), atol=rounding)
    for rows in (1, 5, 200):  # decode steps, a short prompt, a prefill past the int8 kernel's range
        x = torch.randn(2, rows, 256).to(dtype)
        expected = x.float() @ dequantized.T + bias
        tolerance = 1e-4 if dtype == torch.float32 else 0.03 * expected.abs().max()
        assert torch.allclose(layer(x).float(), expected, atol=tolerance)


@pytest.mark.parametrize("portable", [False, True], ids=["kernels", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs,inputs", [(8, 24), (2048, 8), (13, 37), (5, 64), (40, 4100)])
def test_quantized_layers_of_any_width_and_row_count_compute_their_product(monkeypatch, portable, dtype, outputs,
                                                                          inputs):
    """Every width (not only multiples of 16/32/128), 1-5 rows, bf16 and fp32 activations, on the kernels
    and on torch's portable path (ARM, x86 without AVX2, ``VLMKIT_CPU_KERNELS=off``): never a crash."""
    from vlmkit.nn import cpu_kernels
    if portable:
        monkeypatch.setattr(cpu_kernels, "kernels_enabled", lambda: False)
    torch.manual_seed(outputs)
    weight, bias = torch.randn(outputs, inputs), torch.randn(outputs)
    layers = [Int8Linear.from_float(weight, bias, dtype)]
    if inputs % 32 == 0:  # int4 groups are multiples of 32 inputs; narrower layers are int8
        layers.append(Int4Linear.from_float(weight, 32, bias, dtype))
    for layer in layers:
        dequantized = layer.dequantized_weight()
        for rows in range(1, 6):
            x = torch.randn(rows, inputs).to(dtype)
            expected = x.float() @ dequantized.T + bias
            tolerance = 1e-4 * expected.abs().max() if dtype == torch.float32 else 0.03 * expected.abs().max()
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, outputs)
            assert torch.allclose(got.float(), expected, atol=tolerance), (type(layer).__name__, rows)


@needs_int4_kernel
def test_which_layers_are_quantized(llava_onevision_dir, llava_onevision_tied_dir):
    model = load("llava_onevision", str(llava_onevision_dir), "int4")
    layers = quantized_modules(model)
    assert layers["lm_head"] == "Int4Linear"
    assert layers["model.language_model.layers.0.mlp.down_proj"] == "Int4Linear"
    # the vision side (tower, projector) runs once per image on many patches: int8
    assert layers["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "Int8Linear"
    assert layers["model.multi_modal_projector.linear_1"] == "Int8Linear"
    tied = load("llava_onevision", str(llava_onevision_tied_dir), "int8")
    assert "lm_head" not in quantized_modules(tied)  # a tied head is the token embedding
    assert tied.lm_head.weight is tied.text_model.embed_tokens.weight


@pytest.mark.parametrize("name,bits,group_size", [("int8", 8, None),
                                                   pytest.param("int4", 4, 128, marks=needs_int4_kernel)])
def test_a_quantized_model_saves_and_loads_back_without_the_original_weights(janus_dir, tmp_path, name, bits,
                                                                            group_size):
    from safetensors import safe_open
    model = load("janus", str(janus_dir), name, torch.bfloat16)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "vlmkit" and saved["bits"] == bits and saved["group_size"] == group_size
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        dtype = handle.get_tensor("model.language_model.layers.0.mlp.up_proj.weight").dtype
        assert "model.vision_model.encoder.layers.0.self_attn.projection_layer.weight" in handle.keys()
    assert dtype == (torch.int8 if bits == 8 else torch.uint8)
    again = vlmkit_class("janus").from_pretrained(tmp_path)  # dtype "auto": the checkpoint's bfloat16
    assert again.dtype == torch.bfloat16
    assert quantized_modules(again) == quantized_modules(model)
    inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in image_prompt("janus", str(janus_dir)).items()}
    assert torch.equal(forward_logits(again, inputs), forward_logits(model, inputs))
    # decode steps of 1, 2 and 3 rows (the kernels' row counts) answer as the in-memory model does
    ids = inputs["input_ids"][inputs["input_ids"] != model.config.image_token_id][None]  # the text of the prompt
    for rows in (1, 2, 3):
        batch = {"input_ids": ids.expand(rows, -1), "attention_mask": torch.ones(rows, ids.shape[1], dtype=torch.long)}
        with torch.no_grad():
            loaded = again.generate(**batch, max_new_tokens=4, do_sample=False, generation_mode="text")
            in_memory = model.generate(**batch, max_new_tokens=4, do_sample=False, generation_mode="text")
        assert torch.equal(loaded, in_memory)
    # asking for the format it is stored in is fine; asking for another is an error
    vlmkit_class("janus").from_pretrained(tmp_path, quantization_config=name)
    with pytest.raises(InputError, match="already quantized"):
        vlmkit_class("janus").from_pretrained(tmp_path, quantization_config="int8" if bits == 4 else "int4")


def test_janus_draws_images_with_int8_weights(janus_dir):
    from vlmkit import JanusProcessor
    processor = JanusProcessor.from_pretrained(janus_dir)
    model = load("janus", str(janus_dir), "int8", torch.bfloat16)
    assert isinstance(model.model.generation_head.vision_head, Int8Linear)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "A red fox."}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, generation_mode="image")
    tokens = model.generate(**inputs, generation_mode="image", do_sample=False)
    assert tokens.shape == (1, model.num_image_tokens)
    assert tokens.equal(model.generate(**inputs, generation_mode="image", do_sample=False))
    pixels = model.decode_image_tokens(tokens)
    assert pixels.shape[0] == 1 and torch.isfinite(pixels.float()).all()


def test_int4_layers_save_their_values_in_the_portable_form_and_load_them_back():
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    layer = Int4Linear.from_float(weight, 128, dtype=torch.float32)
    state = layer.state_dict()
    assert state["weight"].shape == (96, 128) and state["weight_scale"].shape == (96, 2)
    assert torch.equal(unpack_nibbles(state["weight"]), layer.values())
    again = Int4Linear.from_portable(state["weight"], state["weight_scale"], state["weight_zero"],
                                     dtype=torch.float32)
    assert all(torch.equal(t, again.state_dict()[name]) for name, t in state.items())
    assert torch.allclose(layer.dequantized_weight(), rtn_int4(weight), atol=1e-5)


@pytest.mark.parametrize("value,error,message", [
    ("int3", InputError, "unknown quantization 'int3'"),
    ({"quant_method": "awq", "bits": 4}, InputError, "quant_method 'awq' is not supported"),
    (42, InputError, "quantization_config must be"),
])
def test_bad_quantization_requests_fail_before_any_weight_is_read(janus_dir, monkeypatch, value, error, message):
    monkeypatch.setattr("vlmkit.io.checkpoint.load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(error, match=message):
        vlmkit_class("janus").from_pretrained(janus_dir, quantization_config=value)


def test_a_checkpoint_quantized_in_another_format_is_refused_before_loading(janus_dir, tmp_path, monkeypatch):
    for item in janus_dir.iterdir():
        (tmp_path / item.name).symlink_to(item)
    config = json.loads((janus_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("vlmkit.io.checkpoint.load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(CheckpointError, match="already quantized with 'gptq'"):
        vlmkit_class("janus").from_pretrained(tmp_path)


def _with_config(janus_dir, folder, quantization_config):
    """``folder``: janus_dir's files (linked) under a config.json whose quantization_config is given."""
    for item in janus_dir.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((janus_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


@pytest.mark.parametrize("saved,key", [
    ({"quant_method": "vlmkit", "bits": 8, "format_version": None}, "format_version"),
    ({"quant_method": "vlmkit", "bits": 8, "format_version": "1"}, "format_version"),
    ({"quant_method": "vlmkit", "bits": "eight"}, "bits"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": None}, "llm_int8_threshold"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": "x"}, "llm_int8_threshold"),
    ({"quant_method": "bitsandbytes"}, "load_in_8bit"),
])
def test_a_bad_quantization_config_value_in_config_json_is_refused_naming_the_file_and_key(janus_dir, tmp_path,
                                                                                         saved, key):
    folder = _with_config(janus_dir, tmp_path, saved)
    with pytest.raises(CheckpointError) as error:
        vlmkit_class("janus").from_pretrained(folder)
    assert str(folder / "config.json") in str(error.value) and key in str(error.value)


@pytest.mark.parametrize("saved", [{"quant_method": "vlmkit", "bits": 8},
                                   {"quant_method": "vlmkit", "bits": 4, "group_size": 128},
                                   {"quant_method": "bitsandbytes", "load_in_8bit": True}])
def test_a_config_saying_quantized_over_full_precision_weights_is_refused(janus_dir, tmp_path, saved):
    folder = _with_config(janus_dir, tmp_path, saved)
    with pytest.raises(CheckpointError, match="says the weights are quantized.*but they are not"):
        vlmkit_class("janus").from_pretrained(folder)


def test_full_precision_weights_under_a_quantized_config_are_quantized_when_asked_explicitly(janus_dir, tmp_path):
    folder = _with_config(janus_dir, tmp_path, {"quant_method": "vlmkit", "bits": 8})
    model = vlmkit_class("janus").from_pretrained(folder, dtype=torch.float32, quantization_config="int8")
    assert quantized_modules(model) == quantized_modules(load("janus", str(janus_dir), "int8"))
    assert model.quantization_config.name == "int8"


LAYER = "model.language_model.layers.0.mlp.up_proj"


def _damage(state, suffix, change):
    if change == "missing":
        state.pop(f"{LAYER}.{suffix}")
    elif change == "rows cut":
        state[f"{LAYER}.{suffix}"] = state[f"{LAYER}.{suffix}"][:3].clone()
    elif change == "columns cut":
        state[f"{LAYER}.{suffix}"] = state[f"{LAYER}.{suffix}"][:, :-2].clone()
    else:
        state[f"{LAYER}.{suffix}"] = state[f"{LAYER}.{suffix}"].to(change)


@pytest.mark.parametrize("name,suffix,change", [
    ("int8", "weight_scale", "rows cut"),
    ("int8", "weight_scale", torch.int32),
    ("int8", "weight", "columns cut"),
    ("int8", "weight", torch.float32),
    pytest.param("int4", "weight_zero", "missing", marks=needs_int4_kernel),
    pytest.param("int4", "weight_scale", "rows cut", marks=needs_int4_kernel),
    pytest.param("int4", "weight_scale", torch.int32, marks=needs_int4_kernel),
    pytest.param("int4", "weight", "columns cut", marks=needs_int4_kernel),
])
def test_a_damaged_quantized_tensor_is_refused_at_load_naming_it_and_its_file(janus_dir, tmp_path, name, suffix,
                                                                            change):
    from safetensors.torch import load_file, save_file
    load("janus", str(janus_dir), name).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    _damage(state, suffix, change)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        vlmkit_class("janus").from_pretrained(tmp_path)
    assert f"{LAYER}.{suffix}" in str(error.value) and str(tmp_path / "model.safetensors") in str(error.value)
