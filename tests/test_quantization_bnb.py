"""transformers' bitsandbytes path against transformers + bitsandbytes on each family's tiny checkpoint:
the same layers quantized, 4-bit (nf4, fp4 with double quantization; fp32 compute) logits within 2e-3
of the largest logit and the same greedy tokens, 8-bit the same greedy tokens; checkpoints transformers
saved quantized load; vlmkit's own save round-trips; without bitsandbytes, a clear error."""

import functools
import sys

import pytest
import torch
from quantization_support import (FAMILIES, FIXTURES, forward_logits, greedy_tokens, image_prompt, transformers_class,
                                  vlmkit_class)

from vlmkit.errors import InputError

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@functools.lru_cache(maxsize=32)
def reference_model(family: str, folder: str, config: str, skip: tuple | None = None):
    import transformers
    settings = dict(CONFIGS[config], llm_int8_skip_modules=list(skip) if skip else None)
    model = transformers_class(family).from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**settings), device_map="cpu",
        dtype=torch.float32).eval()
    # On AVX-512 BF16 CPUs bitsandbytes repacks 4-bit weights for its fast CPU kernel, which raises for the
    # tiny layers here (outputs not in blocks of 32, inputs under one quantization block); vlmkit keeps
    # such layers on bitsandbytes' generic path, and so does the reference here (the same 4-bit math).
    import bitsandbytes as bnb

    from vlmkit.quant.bnb import keep_packable_for_cpu
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            keep_packable_for_cpu(module)
    return model


@functools.lru_cache(maxsize=32)
def vlmkit_model(family: str, folder: str, config: str, skip: tuple | None = None):
    from vlmkit import BitsAndBytesConfig
    settings = dict(CONFIGS[config], llm_int8_skip_modules=list(skip) if skip else None)
    return vlmkit_class(family).from_pretrained(folder, quantization_config=BitsAndBytesConfig(**settings),
                                                device_map="cpu", dtype=torch.float32)


def quantized_names(model) -> set[str]:
    import bitsandbytes as bnb

    return {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


@pytest.mark.parametrize("family,fixture,skip,config", [
    *[(family, fixture, None, config) for family, fixture in (
        ("janus", "janus_dir"), ("llava_onevision", "llava_onevision_dir"),
        ("llava_onevision", "llava_onevision_tied_dir"), ("idefics", "idefics_resampler_dir"),
        ("idefics", "idefics_plain_dir")) for config in ("nf4", "int8")],
    # llm_int8_skip_modules replaces transformers' default skips (the LM head is then quantized too)
    ("janus", "janus_dir", ("vision_model", "projection_layer", "generation_head"), "nf4"),
    ("llava_onevision", "llava_onevision_dir", ("multi_modal_projector", "mlp.down_proj"), "nf4"),
    ("idefics", "idefics_resampler_dir", ("perceiver_resampler", "layers.1"), "int8"),
])
def test_the_same_layers_are_quantized_as_in_transformers(request, family, fixture, skip, config):
    folder = str(request.getfixturevalue(fixture))
    ours = vlmkit_model(family, folder, config, skip)
    expected = quantized_names(reference_model(family, folder, config, skip))
    assert expected  # the comparison means something
    assert quantized_names(ours) == expected


@pytest.mark.parametrize("config", ["nf4", "fp4-double-quant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_logits_and_greedy_tokens_match_transformers(request, family, config):
    folder = str(request.getfixturevalue(FIXTURES[family]))
    inputs = image_prompt(family, folder)
    reference, ours = reference_model(family, folder, config), vlmkit_model(family, folder, config)
    expected, got = forward_logits(reference, inputs), forward_logits(ours, inputs)
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()
    assert greedy_tokens(ours, inputs, family) == greedy_tokens(reference, inputs, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_8bit_greedy_tokens_match_transformers(request, family):
    folder = str(request.getfixturevalue(FIXTURES[family]))
    inputs = image_prompt(family, folder)
    reference, ours = reference_model(family, folder, "int8"), vlmkit_model(family, folder, "int8")
    assert greedy_tokens(ours, inputs, family) == greedy_tokens(reference, inputs, family)


@pytest.mark.parametrize("config", ["nf4", "int8"])
def test_a_checkpoint_transformers_saved_quantized_loads_as_stored(janus_dir, tmp_path, config):
    reference = reference_model("janus", str(janus_dir), config)
    reference.save_pretrained(tmp_path)
    # the processor files are not part of a model's save: vlmkit reads them from the source checkpoint
    inputs = image_prompt("janus", str(janus_dir))
    ours = vlmkit_class("janus").from_pretrained(tmp_path, dtype=torch.float32)
    assert quantized_names(ours) == quantized_names(reference)
    expected, got = forward_logits(reference, inputs), forward_logits(ours, inputs)
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()
    with pytest.raises(InputError, match="already quantized as bitsandbytes"):
        vlmkit_class("janus").from_pretrained(tmp_path, quantization_config="int8")


def test_transformers_own_config_object_is_accepted():
    import transformers

    from vlmkit.quant import parse_quantization_config
    config = parse_quantization_config(transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vision_tower"]))
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.llm_int8_skip_modules == ["vision_tower"]


def test_a_vlmkit_bnb_model_saves_and_loads_back_quantized(llava_onevision_dir, tmp_path):
    import json
    model = vlmkit_model("llava_onevision", str(llava_onevision_dir), "nf4")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    again = vlmkit_class("llava_onevision").from_pretrained(tmp_path, dtype=torch.float32)
    inputs = image_prompt("llava_onevision", str(llava_onevision_dir))
    assert quantized_names(again) == quantized_names(model)
    assert torch.equal(forward_logits(again, inputs), forward_logits(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_saving_after_answering_keeps_the_answers_live_and_saved(request, family, tmp_path):
    """On AVX-512 BF16 CPUs bitsandbytes repacks a 4-bit layer at its first forward; its own undoing for
    a save left the block scales scrambled (without double quantization), changing the live model too."""
    folder = str(request.getfixturevalue(FIXTURES[family]))
    model = vlmkit_model.__wrapped__(family, folder, "nf4")  # a model of its own: this one is saved after use
    inputs = image_prompt(family, folder)
    answered = greedy_tokens(model, inputs, family)
    model.save_pretrained(tmp_path)
    assert greedy_tokens(model, inputs, family) == answered
    assert greedy_tokens(vlmkit_class(family).from_pretrained(tmp_path, dtype=torch.float32), inputs, family) == answered


def test_without_bitsandbytes_the_error_names_the_extra_before_any_weight_is_read(janus_dir, monkeypatch):
    from vlmkit import BitsAndBytesConfig, JanusForConditionalGeneration
    from vlmkit.errors import InputError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    monkeypatch.setattr("vlmkit.io.checkpoint.load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(InputError, match=r"pip install 'vlmkit\[bnb\]'"):
        JanusForConditionalGeneration.from_pretrained(janus_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16), device_map="auto")


def test_the_seed_snippet_runs_with_only_the_import_changed(llava_onevision_dir):
    from vlmkit import BitsAndBytesConfig, LlavaOnevisionForConditionalGeneration
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float16)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir,
                                                                   quantization_config=quantization_config,
                                                                   device_map="auto")
    inputs = image_prompt("llava_onevision", str(llava_onevision_dir))
    tokens = greedy_tokens(model, {k: v.to(model.device) for k, v in inputs.items()}, "llava_onevision", 4)
    assert len(tokens) == 4
