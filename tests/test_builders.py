"""Sanity checks of the test-side checkpoint builders, against transformers only (no vlmkit)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from builders.janus import (
    JANUS_BOI_TOKEN,
    JANUS_BOS,
    JANUS_EOI_TOKEN,
    JANUS_EOS,
    JANUS_IMAGE_TOKEN,
    JANUS_PAD,
    JANUS_PRO_CHAT_TEMPLATE,
    JANUS_SPECIAL_TOKENS,
    build_tiny_janus,
    write_original_layout,
)
from vlmkit.bench.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, JanusForConditionalGeneration, JanusProcessor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.\n\n"
)
TEXTS = [
    "What color is the dog?",
    "Describe this image.\n\nThere are 12 cats; 3 are black!",
    "  leading and trailing spaces  ",
    f"{JANUS_IMAGE_TOKEN}\nWhat is in the image?",
    "<|User|>: hi\n\n<|Assistant|>: Café 日本 🙂",
]


@pytest.fixture(scope="module")
def processor(janus_dir):
    return JanusProcessor.from_pretrained(janus_dir, backend="pil")


@pytest.fixture(scope="module")
def model(janus_dir):
    return JanusForConditionalGeneration.from_pretrained(janus_dir).eval()


def _chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_builder_generic(tmp_path):
    path = build_tokenizer(tmp_path, special_tokens=["<a>", "<b>"], bos="<s>", eos="</s>", pad="<pad>", vocab_size=500)
    tok = Tokenizer.from_file(str(path))
    base = tok.get_vocab_size(with_added_tokens=False)
    assert [tok.token_to_id(t) for t in ["<a>", "<b>", "<s>", "</s>", "<pad>"]] == list(range(base, base + 5))
    for text in TEXTS:
        enc = tok.encode(text)
        assert enc.ids[0] == tok.token_to_id("<s>")
        assert tok.decode(enc.ids[1:]) == text
    assert tok.encode("x <a>y<b>").ids[-3:] == [tok.token_to_id("<a>"), tok.token_to_id("y"), tok.token_to_id("<b>")]

    no_bos = Tokenizer.from_file(str(build_tokenizer(tmp_path / "nb", special_tokens=[], bos="<s>", eos=None, pad=None, add_bos=False)))
    assert no_bos.decode(no_bos.encode("hello world").ids) == "hello world"
    assert no_bos.token_to_id("<s>") not in no_bos.encode("hello world").ids


def test_transformers_tokenizer_uses_tokenizer_json_unchanged(janus_dir, processor):
    raw = Tokenizer.from_file(str(janus_dir / "tokenizer.json"))
    hf_tok = processor.tokenizer
    assert json.loads((janus_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    for text in TEXTS:
        assert hf_tok(text).input_ids == raw.encode(text).ids
        assert hf_tok.decode(raw.encode(text).ids, skip_special_tokens=True) == text.replace(JANUS_IMAGE_TOKEN, "").replace(
            "<|User|>", ""
        ).replace("<|Assistant|>", "")
    ids = {t: raw.token_to_id(t) for t in JANUS_SPECIAL_TOKENS}
    assert hf_tok.bos_token_id == ids[JANUS_BOS]
    assert hf_tok.eos_token_id == ids[JANUS_EOS]
    assert hf_tok.pad_token_id == ids[JANUS_PAD]
    assert hf_tok.image_token_id == ids[JANUS_IMAGE_TOKEN]
    assert hf_tok.boi_token_id == ids[JANUS_BOI_TOKEN]
    assert hf_tok.eoi_token_id == ids[JANUS_EOI_TOKEN]


# ------------------------------------------------------------------------------------------------
# transformers-layout checkpoint


def test_reference_config_and_files(janus_dir, model, processor):
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]:
        assert (janus_dir / name).exists(), name
    assert (janus_dir / "chat_template.jinja").read_text() == JANUS_PRO_CHAT_TEMPLATE
    assert processor.chat_template == JANUS_PRO_CHAT_TEMPLATE
    cfg = model.config
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.image_token_id
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id, cfg.text_config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.text_config.vocab_size >= len(tok)
    assert cfg.text_config.num_key_value_heads == 2 and cfg.text_config.num_attention_heads == 4
    assert not cfg.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    assert cfg.vision_config.num_image_tokens == processor.num_image_tokens == 16
    gen = model.generation_config
    assert gen.generation_kwargs["boi_token_id"] == tok.boi_token_id
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    ip = processor.image_processor
    assert list(ip.image_mean) == [0.5, 0.5, 0.5] and list(ip.image_std) == [0.5, 0.5, 0.5]
    assert ip.min_size == 14 and ip.size.height == ip.size.width == 32 and int(ip.resample) == 3
    assert processor.use_default_system_prompt


def test_single_image_chat(processor, model, sample_images):
    inputs = processor.apply_chat_template(
        _chat(sample_images["square"], "What is in the image?"),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    ids = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.image_token_id) == 16
    text = tok.decode(ids)
    expected = (
        f"{JANUS_BOS}{SYSTEM_PROMPT}<|User|>: {JANUS_BOI_TOKEN}{JANUS_IMAGE_TOKEN * 16}{JANUS_EOI_TOKEN}\n"
        "What is in the image?\n\n<|Assistant|>:"
    )
    assert text == expected
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)

    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and len(ids) < out.shape[1] <= len(ids) + 6
    assert out[0, : len(ids)].tolist() == ids
    # the image matters: another image gives other logits
    other = processor.apply_chat_template(
        _chat(sample_images["wide"], "What is in the image?"),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)
    assert a.std() > 0.3  # not degenerate


def test_greedy_outputs_vary(processor, model, sample_images):
    outs = set()
    for name in ["square", "wide", "tall"]:
        for q in ["What is in the image?", "Describe the color of the dog."]:
            inputs = processor.apply_chat_template(
                _chat(sample_images[name], q), add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt",
            )
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            outs.add(tuple(out[0, inputs["input_ids"].shape[1]:].tolist()))
    assert len(outs) >= 4


def test_two_images_and_padded_batch(processor, model, sample_images):
    tok = processor.tokenizer
    conv = [{"role": "user", "content": [
        {"type": "image", "image": sample_images["square"]},
        {"type": "image", "image": sample_images["tall"]},
        {"type": "text", "text": "Which image is brighter?"},
    ]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == (
        "<|User|>: <image_placeholder>\n\n<image_placeholder>\nWhich image is brighter?\n\n<|Assistant|>:"
    )
    two = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert two["pixel_values"].shape == (2, 3, 32, 32)
    assert (two["input_ids"] == tok.image_token_id).sum() == 32
    model.generate(**two, max_new_tokens=3, do_sample=False)

    conv_a = _chat(sample_images["square"], "What is in the image?")
    conv_b = _chat(sample_images["wide"], "Describe this image in great detail, with all the colors you can see.")
    batch = processor.apply_chat_template(
        [conv_a, conv_b], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and mask[0].sum() < mask[1].sum()
    assert mask[0, 0] == 0 and batch["input_ids"][0, 0] == tok.pad_token_id  # left padding
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    for i, conv in enumerate([conv_a, conv_b]):
        single = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        ref = model.generate(**single, max_new_tokens=5, do_sample=False)[0, single["input_ids"].shape[1]:]
        assert new[i, : len(ref)].tolist() == ref.tolist()


def test_text_to_image(processor, model):
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "A red dog on the grass."}]}], add_generation_prompt=True
    )
    assert prompt == "<|User|>: A red dog on the grass.\n\n<|Assistant|>:"
    inputs = processor(text=prompt, generation_mode="image", return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.boi_token_id
    assert tok.decode(ids) == f"{JANUS_BOS}{prompt}{JANUS_BOI_TOKEN}"  # no system prompt in image mode
    tokens = model.generate(**inputs, generation_mode="image", do_sample=False)
    assert tokens.shape == (1, 16)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.config.vq_config.num_embeddings
    again = model.generate(**inputs, generation_mode="image", do_sample=False)
    assert torch.equal(tokens, again)
    pixels = model.decode_image_tokens(tokens)  # [B, H, W, 3]; H = 4 patches * 2 (one upsampling)
    assert pixels.shape == (1, 8, 8, 3)
    images = processor.postprocess(list(pixels.permute(0, 3, 1, 2).float()), return_tensors="PIL.Image.Image")
    assert images["pixel_values"][0].size == (8, 8)


def test_sample_images_through_reference(processor, sample_images):
    assert {k: (v.mode, v.size) for k, v in sample_images.items()} == {
        "square": ("RGB", (40, 40)), "wide": ("RGB", (64, 20)), "tall": ("RGB", (20, 64)), "tiny": ("RGB", (3, 5)),
        "gray": ("L", (36, 28)), "rgba": ("RGBA", (30, 40)), "palette": ("P", (44, 32)),
    }
    for name, image in sample_images.items():
        pv = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert pv.shape == (1, 3, 32, 32), name


def test_mha_and_other_sizes(tmp_path):
    d = build_tiny_janus(tmp_path, seed=1, num_key_value_heads=4, image_size=48, patch_size=8, num_embeddings=32,
                         channel_multiplier=[1, 1, 2])
    m = JanusForConditionalGeneration.from_pretrained(d)
    assert m.config.text_config.num_key_value_heads == 4
    p = JanusProcessor.from_pretrained(d, backend="pil")
    assert p.num_image_tokens == 36 == m.config.vision_config.num_image_tokens
    assert m.model.vqmodel.decode(torch.zeros(1, 36, dtype=torch.long)).shape == (1, 3, 24, 24)


# ------------------------------------------------------------------------------------------------
# original layout

# A tiny inverse (original -> transformers) written for the test only.
_INVERSE = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.", r"model.vision_model.encoder.layers.\1.self_attn.QKV."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.2\.", "model.aligner.hidden_layers.0."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.2\.", "model.generation_aligner.hidden_layers.0."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
    (r"encoder\.conv_blocks\.", "encoder.down."),
    (r"decoder\.conv_blocks\.(\d+)\.res\.", r"decoder.up.\1.block."),
    (r"decoder\.conv_blocks\.", "decoder.up."),
    (r"\.mid\.0\.", ".mid.block_1."),
    (r"\.mid\.1\.", ".mid.attn_1."),
    (r"\.mid\.2\.", ".mid.block_2."),
]


def _original_to_hf(state):
    out = {}
    for key, t in state.items():
        if ".attn_pool." in key or key.endswith("quantize.codebook_used"):
            continue
        new = key
        for pat, rep in _INVERSE:
            new = re.sub(pat, rep, new)
        if ".QKV." in new:
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[new.replace(".QKV.", f".{name}_proj.")] = part
        elif new.endswith("position_embedding.weight"):
            out[new] = t.squeeze(0)
        else:
            out[new] = t
    return out


def test_original_layout_roundtrip(janus_dir, janus_original_dir):
    hf = load_file(str(janus_dir / "model.safetensors"))
    orig = torch.load(janus_original_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert orig["vision_model.vision_tower.pos_embed"].shape == (1, 16, 32)
    assert orig["vision_model.vision_tower.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert orig["vision_model.vision_tower.blocks.0.attn.qkv.bias"].shape == (96,)
    assert any(k.startswith("vision_model.vision_tower.attn_pool.") for k in orig)
    assert "gen_vision_model.quantize.codebook_used" in orig
    back = _original_to_hf(orig)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k

    cfg = json.loads((janus_original_dir / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"
    assert cfg["vision_config"]["cls"] == "CLIPVisionTower"
    assert cfg["vision_config"]["params"]["image_size"] == 32
    assert cfg["aligner_config"]["params"] == {"depth": 2, "input_dim": 32, "n_embed": 64, "projector_type": "mlp_gelu"}
    assert cfg["gen_vision_config"]["params"]["image_token_size"] == 64
    assert cfg["gen_vision_config"]["params"]["n_embed"] == 8
    assert cfg["gen_head_config"]["params"]["image_token_size"] == 64
    assert cfg["language_config"]["vocab_size"] == orig["language_model.lm_head.weight"].shape[0]

    # the copied tokenizer and the original processor files
    assert (janus_original_dir / "tokenizer.json").read_bytes() == (janus_dir / "tokenizer.json").read_bytes()
    pre = json.loads((janus_original_dir / "preprocessor_config.json").read_text())
    assert pre["image_size"] == 32 and pre["image_mean"] == [0.5] * 3 and pre["background_color"] == [127] * 3
    proc = json.loads((janus_original_dir / "processor_config.json").read_text())
    assert proc["num_image_tokens"] == 16 and proc["image_tag"] == JANUS_IMAGE_TOKEN
    stm = json.loads((janus_original_dir / "special_tokens_map.json").read_text())
    assert stm["pad_token"] == JANUS_PAD and "<|User|>" in stm["additional_special_tokens"]
    # transformers loads the original tokenizer files to the same ids (LlamaTokenizerFast -> TokenizersBackend)
    tok = AutoTokenizer.from_pretrained(janus_original_dir)
    raw = Tokenizer.from_file(str(janus_original_dir / "tokenizer.json"))
    for text in TEXTS:
        assert tok(text).input_ids == raw.encode(text).ids


@pytest.mark.parametrize("weights,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 2)])
def test_original_layout_formats(janus_dir, janus_original_dir, tmp_path, weights, shards):
    d = write_original_layout(janus_dir, tmp_path, weights=weights, shards=shards)
    ref = torch.load(janus_original_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if shards == 1:
        assert not list(d.glob("*.index.json"))
        state = load_file(str(d / "model.safetensors"))
    else:
        index_name = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
        index = json.loads((d / index_name).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) == shards
        state = {}
        for f in files:
            part = load_file(str(d / f)) if weights == "safetensors" else torch.load(d / f, weights_only=True)
            assert all(index["weight_map"][k] == f for k in part)
            state.update(part)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert sorted(state) == sorted(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
    assert not (d / "pytorch_model.bin").exists() or weights == "bin"
    assert np.isclose(json.loads((d / "preprocessor_config.json").read_text())["rescale_factor"], 1 / 255)
