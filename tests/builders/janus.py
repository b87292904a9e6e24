"""Tiny random Janus(-Pro) checkpoints for tests, in two layouts.

* `build_tiny_janus(out_dir)`: the Transformers layout (`model_type: "janus"`, as the
  `deepseek-community/Janus-Pro-*` repos), written by `transformers` itself, so
  `JanusForConditionalGeneration.from_pretrained` / `JanusProcessor.from_pretrained` are the reference.
* `write_original_layout(hf_dir, out_dir)`: the same weights in DeepSeek's original
  `deepseek-ai/Janus-Pro-*` layout (`model_type: "multi_modality"`), renamed here independently of
  vlmkit's own loader (which maps the other way).

Everything is built offline from a seed: a byte-level BPE tokenizer trained in code, random weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from vlmkit.bench.tokenizer import build_tokenizer
from vlmkit.models.janus.chat_template import JANUS_PRO_CHAT_TEMPLATE

__all__ = [
    "JANUS_PRO_CHAT_TEMPLATE",
    "JANUS_BOS",
    "JANUS_EOS",
    "JANUS_PAD",
    "JANUS_IMAGE_TOKEN",
    "JANUS_BOI_TOKEN",
    "JANUS_EOI_TOKEN",
    "JANUS_SPECIAL_TOKENS",
    "JANUS_ADDITIONAL_SPECIAL_TOKENS",
    "build_tiny_janus",
    "write_original_layout",
    "hf_to_original_state_dict",
    "original_config_from_hf",
]


JANUS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # <｜begin▁of▁sentence｜>
JANUS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # <｜end▁of▁sentence｜>
JANUS_PAD = "<\uff5c\u2581pad\u2581\uff5c>"  # <｜▁pad▁｜>
JANUS_IMAGE_TOKEN = "<image_placeholder>"
JANUS_BOI_TOKEN = "<begin_of_image>"
JANUS_EOI_TOKEN = "<end_of_image>"
# `additional_special_tokens` of the real checkpoints' special_tokens_map.json.
JANUS_ADDITIONAL_SPECIAL_TOKENS = [
    JANUS_IMAGE_TOKEN,
    "<patch_placeholder>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
]
# All added (special) tokens, in the real vocabulary's relative order: BOS, EOS, pad, begin/end of
# image (100000, 100001, 100015, 100016, 100017 in the real one), then the image placeholder and
# the rest (100581...). Here they get ids right after the tiny BPE vocabulary.
JANUS_SPECIAL_TOKENS = [
    JANUS_BOS,
    JANUS_EOS,
    JANUS_PAD,
    JANUS_BOI_TOKEN,
    JANUS_EOI_TOKEN,
    *JANUS_ADDITIONAL_SPECIAL_TOKENS,
]

# The real checkpoints store a 65536-entry usage buffer regardless of the codebook size.
_CODEBOOK_USED_SIZE = 65536


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, non-degenerate random weights (independent of the global RNG).

    Matrices/convs ~ N(0, 1/fan_in) so activations stay O(1) and logits have std ~1, with 3x larger
    q/k projections so that greedy outputs depend on the image and the question, not only on the
    prompt's last token; every bias and every norm weight is random
    too, so a loader that drops, swaps or mis-splits any tensor (q/k/v order of a fused qkv bias,
    LayerNorm vs. GroupNorm affine...) changes the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            shape = p.shape
            if name.endswith("bias"):
                new = 0.1 * torch.randn(shape, generator=gen)
            elif p.ndim == 1:  # LayerNorm / RMSNorm / GroupNorm scales
                new = 1.0 + 0.2 * torch.randn(shape, generator=gen)
            elif "position_embedding" in name:
                new = 0.5 * torch.randn(shape, generator=gen)
            elif isinstance(_module_of(model, name), torch.nn.Embedding):
                # token embeddings, generation (VQ code) embeddings, VQ codebook
                new = torch.randn(shape, generator=gen)
            else:
                fan_in = math.prod(shape[1:])
                gain = 1.0
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    # sharper attention: with ~uniform attention over 100+ prompt tokens the image and
                    # the question barely reach the last position and greedy outputs look alike.
                    gain = 3.0
                new = gain * torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(new.to(p.dtype))


def _module_of(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def build_tiny_janus(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    text_hidden_size: int = 64,
    text_num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_num_layers: int = 2,
    vision_num_heads: int = 2,
    vq_embed_dim: int = 8,
    num_embeddings: int = 64,
    base_channels: int = 32,
    channel_multiplier: tuple[int, ...] | list[int] = (1, 2),
    latent_channels: int = 32,
    num_res_blocks: int = 1,
    max_position_embeddings: int = 512,
    tokenizer_vocab_size: int = 600,
) -> Path:
    """Write a tiny random Janus-Pro checkpoint in the Transformers layout; returns `out_dir`.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, processor_config.json (with the image processor's settings inside),
    chat_template.jinja. Loadable with `JanusForConditionalGeneration.from_pretrained(out_dir)` and
    `JanusProcessor.from_pretrained(out_dir, backend="pil")`.
    """
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_image_tokens = (image_size // patch_size) ** 2

    # --- tokenizer ---------------------------------------------------------------------------
    tok_path = build_tokenizer(
        out_dir,
        special_tokens=JANUS_SPECIAL_TOKENS,
        bos=JANUS_BOS,
        eos=JANUS_EOS,
        pad=JANUS_PAD,
        unk=None,
        vocab_size=tokenizer_vocab_size,
        add_bos=True,
        seed=seed,
    )
    # Class: the generic `TokenizersBackend` (= `PreTrainedTokenizerFast` in transformers 5), so the
    # saved tokenizer_config.json says `"tokenizer_class": "TokenizersBackend"`. Under it transformers
    # uses tokenizer.json unchanged (pre-tokenizer, post-processor adding BOS, decoder). The real
    # checkpoints say LlamaTokenizerFast; transformers 5's LlamaTokenizer rebuilds a Metaspace /
    # byte-fallback pipeline of its own (5.23 detects a ByteLevel tokenizer.json and falls back to
    # TokenizersBackend with a warning), so the generic class is the one that is unambiguous.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        bos_token=JANUS_BOS,
        eos_token=JANUS_EOS,
        pad_token=JANUS_PAD,
        unk_token=None,
        model_max_length=16384,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "image_token": JANUS_IMAGE_TOKEN,
            "boi_token": JANUS_BOI_TOKEN,
            "eoi_token": JANUS_EOI_TOKEN,
        },
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in JANUS_SPECIAL_TOKENS}
    n_tokens = len(tokenizer)
    # The real vocabulary (102400) is padded past the tokenizer's 100k+ tokens: do the same.
    vocab_size = ((n_tokens + 63) // 64) * 64

    # --- config ------------------------------------------------------------------------------
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=text_num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        # rms_norm_eps / rope theta: LLaMA defaults (1e-6, 10000), as the real language_config
        # relies on them too.
        bos_token_id=ids[JANUS_BOS],
        eos_token_id=ids[JANUS_EOS],
        pad_token_id=ids[JANUS_PAD],
        tie_word_embeddings=False,
    )
    vision_config = JanusVisionConfig(
        hidden_size=vision_hidden_size,
        num_hidden_layers=vision_num_layers,
        num_attention_heads=vision_num_heads,
        image_size=image_size,
        patch_size=patch_size,
        mlp_ratio=4.0,
        projection_dim=text_hidden_size,
        depth=2,
        num_image_tokens=num_image_tokens,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=vq_embed_dim,
        num_embeddings=num_embeddings,
        latent_channels=latent_channels,
        base_channels=base_channels,
        channel_multiplier=list(channel_multiplier),
        num_res_blocks=num_res_blocks,
        projection_dim=text_hidden_size,
        image_token_embed_dim=text_hidden_size,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=ids[JANUS_IMAGE_TOKEN],
        tie_word_embeddings=False,
    )

    # --- model -------------------------------------------------------------------------------
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    _randomize_(model, seed)

    # What the converted checkpoints carry (convert_janus_weights_to_hf.py + the hub's json): the
    # image path of `generate` reads generation_kwargs["boi_token_id"] and pad/bos for the
    # unconditional rows; guidance 5, temperature 1.
    model.generation_config = GenerationConfig(
        bos_token_id=ids[JANUS_BOS],
        eos_token_id=ids[JANUS_EOS],
        pad_token_id=ids[JANUS_PAD],
        guidance_scale=5,
        temperature=1,
        generation_kwargs={"boi_token_id": ids[JANUS_BOI_TOKEN]},
    )
    model.generation_config._from_model_config = False
    model.save_pretrained(out_dir)  # safetensors

    # --- processor ---------------------------------------------------------------------------
    image_processor = JanusImageProcessorPil(
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_size=14,
        size={"height": image_size, "width": image_size},
        resample=3,  # PILImageResampling.BICUBIC
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_pad=True,
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=JANUS_PRO_CHAT_TEMPLATE,
        use_default_system_prompt=True,
        num_image_tokens=num_image_tokens,
    )
    processor.save_pretrained(out_dir)
    # save_pretrained rewrites tokenizer.json from the loaded backend (checked: byte-identical JSON
    # content to what build_tokenizer wrote; tests compare against tokenizers.Tokenizer.from_file).
    return out_dir


# ------------------------------------------------------------------------------------------------
# DeepSeek's original layout
# ------------------------------------------------------------------------------------------------

def _hf_key_to_original(key: str) -> str | None:
    """One Transformers Janus weight name -> the original `MultiModalityCausalLM` name.

    q/k/v projections of the vision tower map to the fused `attn.qkv` (concatenated by the caller).
    Returns None for tensors the original does not have.
    """
    # language model
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]

    # SigLIP vision tower
    vt = "vision_model.vision_tower."
    if key == "model.vision_model.embeddings.position_embedding.weight":
        return vt + "pos_embed"
    if key.startswith("model.vision_model.embeddings.patch_embedding."):
        return vt + "patch_embed.proj." + key.rsplit(".", 1)[1]
    if key.startswith("model.vision_model.post_layernorm."):
        return vt + "norm." + key.rsplit(".", 1)[1]
    m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.groups()
        sub = {
            "layer_norm1": "norm1",
            "layer_norm2": "norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "self_attn.projection_layer": "attn.proj",
            "self_attn.q_proj": "attn.qkv",
            "self_attn.k_proj": "attn.qkv",
            "self_attn.v_proj": "attn.qkv",
        }
        mod, leaf = rest.rsplit(".", 1)
        if mod not in sub:
            raise KeyError(f"unmapped vision weight {key}")
        return f"{vt}blocks.{i}.{sub[mod]}.{leaf}"

    # understanding aligner / generation aligner: MLP as nn.Sequential(Linear, GELU, Linear, ...)
    for hf_prefix, orig_prefix in (("model.aligner.", "aligner."), ("model.generation_aligner.", "gen_aligner.")):
        if key.startswith(hf_prefix):
            rest = key[len(hf_prefix):]
            if rest.startswith("fc1."):
                return f"{orig_prefix}layers.0.{rest[4:]}"
            m = re.fullmatch(r"hidden_layers\.(\d+)\.(.+)", rest)
            if m:
                j, leaf = m.groups()
                return f"{orig_prefix}layers.{2 * int(j) + 2}.{leaf}"
            raise KeyError(f"unmapped aligner weight {key}")

    # generation head / embeddings
    if key.startswith("model.generation_head.proj_out."):
        return "gen_head.output_mlp_projector." + key.rsplit(".", 1)[1]
    if key.startswith("model.generation_head.vision_head."):
        return "gen_head.vision_head." + key.rsplit(".", 1)[1]
    if key == "model.generation_embeddings.weight":
        return "gen_embed.weight"

    # VQ model
    if key.startswith("model.vqmodel."):
        rest = key[len("model.vqmodel."):]
        rest = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", rest)
        rest = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", rest)
        rest = re.sub(r"^decoder\.up\.(\d+)\.block\.", r"decoder.conv_blocks.\1.res.", rest)
        rest = re.sub(r"^decoder\.up\.(\d+)\.", r"decoder.conv_blocks.\1.", rest)
        rest = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0.", rest)
        rest = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1.", rest)
        rest = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2.", rest)
        return "gen_vision_model." + rest

    raise KeyError(f"unmapped Janus weight {key}")


def hf_to_original_state_dict(hf_state: dict[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rename a Transformers Janus state dict to the original layout (fresh, contiguous tensors).

    Adds what the original checkpoints carry and loaders must ignore: the SigLIP attention-pool
    head (`vision_model.vision_tower.attn_pool.*`, random) and `gen_vision_model.quantize.codebook_used`.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        new = _hf_key_to_original(key)
        if new is None:
            continue
        m = re.search(r"self_attn\.([qkv])_proj\.", key)
        if m and ".attn.qkv." in new:  # vision tower only; the LLaMA keeps separate q/k/v
            qkv.setdefault(new, {})[m.group(1)] = tensor
            out.setdefault(new, None)  # keep the position of the fused tensor in the key order
            continue
        if key == "model.vision_model.embeddings.position_embedding.weight":
            tensor = tensor.unsqueeze(0)  # [1, num_patches, width]
        out[new] = tensor.detach().clone().contiguous()
    for new, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"incomplete q/k/v for {new}: {sorted(parts)}")
        out[new] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()

    # Things the original has that Transformers drops.
    width = out["vision_model.vision_tower.pos_embed"].shape[-1]
    dtype = out["vision_model.vision_tower.pos_embed"].dtype
    gen = torch.Generator().manual_seed(seed + 12345)
    mlp_hidden = 4 * width

    def rnd(*shape):
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

    pool = "vision_model.vision_tower.attn_pool."
    out[pool + "latent"] = rnd(1, 1, width)
    out[pool + "q.weight"] = rnd(width, width)
    out[pool + "q.bias"] = rnd(width)
    out[pool + "kv.weight"] = rnd(2 * width, width)
    out[pool + "kv.bias"] = rnd(2 * width)
    out[pool + "proj.weight"] = rnd(width, width)
    out[pool + "proj.bias"] = rnd(width)
    out[pool + "norm.weight"] = torch.ones(width, dtype=dtype)
    out[pool + "norm.bias"] = torch.zeros(width, dtype=dtype)
    out[pool + "mlp.fc1.weight"] = rnd(mlp_hidden, width)
    out[pool + "mlp.fc1.bias"] = rnd(mlp_hidden)
    out[pool + "mlp.fc2.weight"] = rnd(width, mlp_hidden)
    out[pool + "mlp.fc2.bias"] = rnd(width)
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(_CODEBOOK_USED_SIZE, dtype=dtype)
    return out


def original_config_from_hf(hf_config: dict) -> dict:
    """The original `config.json` (model_type "multi_modality") describing a Transformers Janus config.

    The original code reads only a few keys (vision `params.model_name/image_size/select_layer`, which
    pick hard-coded SigLIP sizes; `aligner_config.params`; `gen_vision_config.params.image_token_size
    /n_embed`; `gen_aligner/gen_head` params; `language_config` as a LlamaConfig). To describe tiny
    sizes, extra `params` keys are added under the names the original code uses for them:
    `width/layers/heads/patch_size/mlp_ratio` (siglip_vit.SigLIPVisionCfg) for the vision tower,
    `encoder_ch_mult/decoder_ch_mult/z_channels` (vq_model.ModelArgs) and `ch/num_res_blocks`
    (vq_model.Encoder/Decoder arguments) for the VQ model.
    """
    t, v, q = hf_config["text_config"], hf_config["vision_config"], hf_config["vq_config"]
    language_config = {
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "model_type": "llama",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "torch_dtype": "float32",
        "vocab_size": t["vocab_size"],
    }
    # Only write LLaMA settings that differ from LLaMA's defaults (the real config omits them).
    if t.get("rms_norm_eps", 1e-6) != 1e-6:
        language_config["rms_norm_eps"] = t["rms_norm_eps"]
    rope = t.get("rope_parameters") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    if theta != 10000.0:
        language_config["rope_theta"] = theta
    if t.get("hidden_act", "silu") != "silu":
        language_config["hidden_act"] = t["hidden_act"]

    return {
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "depth": v["depth"],
                "input_dim": v["hidden_size"],
                "n_embed": v["projection_dim"],
                "projector_type": "mlp_gelu",
            },
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {
                "depth": q["num_hidden_layers"],
                "input_dim": q["embed_dim"],
                "n_embed": q["projection_dim"],
                "projector_type": "mlp_gelu",
            },
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                # original vision_head: Linear(n_embed -> image_token_embed), GELU,
                # Linear(image_token_embed -> image_token_size)
                "image_token_embed": q["projection_dim"],
                "image_token_size": q["num_embeddings"],
                "n_embed": q["image_token_embed_dim"],
            },
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": q["num_embeddings"],
                "n_embed": q["embed_dim"],
                # tiny sizes (VQ-16 hard-codes ch 128, [1,1,2,2,4], z 256, 2 res blocks)
                "ch": q["base_channels"],
                "encoder_ch_mult": list(q["channel_multiplier"]),
                "decoder_ch_mult": list(q["channel_multiplier"]),
                "z_channels": q["latent_channels"],
                "num_res_blocks": q["num_res_blocks"],
            },
        },
        "language_config": language_config,
        "model_type": "multi_modality",
        "torch_dtype": "float32",
        "transformers_version": "4.33.1",
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": v["image_size"],
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
                # tiny sizes (the model_name's SigLIP_MODEL_CONFIG entry is 1024/24/16/16/4)
                "width": v["hidden_size"],
                "layers": v["num_hidden_layers"],
                "heads": v["num_attention_heads"],
                "patch_size": v["patch_size"],
                "mlp_ratio": v["mlp_ratio"],
            },
        },
    }


def _load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = hf_dir / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(hf_dir / shard)))
    return state


def _split_shards(keys: list[str], shards: int) -> list[list[str]]:
    shards = max(1, min(shards, len(keys)))
    per = math.ceil(len(keys) / shards)
    return [keys[i : i + per] for i in range(0, len(keys), per)]


def write_original_layout(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: str = "bin",
    shards: int = 1,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Path:
    """Write the checkpoint at `hf_dir` (from `build_tiny_janus`) in the `deepseek-ai/Janus-Pro` layout.

    weights="bin": `pytorch_model.bin` (plain `torch.save` of a dict of tensors; loadable with
    `torch.load(weights_only=True)`), weights="safetensors": `model.safetensors`. With shards > 1 the
    tensors are split over `pytorch_model-0000i-of-0000N.bin` / `model-0000i-of-0000N.safetensors`
    plus the `*.index.json` weight map. Also writes the original config.json, preprocessor_config.json,
    processor_config.json, special_tokens_map.json, tokenizer_config.json, and copies tokenizer.json.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights not in ("bin", "safetensors"):
        raise ValueError("weights must be 'bin' or 'safetensors'")

    hf_config = json.loads((hf_dir / "config.json").read_text())
    state = hf_to_original_state_dict(_load_hf_state(hf_dir), seed=seed)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}

    # --- weights -------------------------------------------------------------------------------
    keys = list(state)
    groups = _split_shards(keys, shards)
    n = len(groups)
    if weights == "bin":
        names = ["pytorch_model.bin"] if n == 1 else [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]
        index_name = "pytorch_model.bin.index.json"
    else:
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        index_name = "model.safetensors.index.json"
    for name, group in zip(names, groups):
        part = {k: state[k] for k in group}
        if weights == "bin":
            torch.save(part, out_dir / name)
        else:
            from safetensors.torch import save_file

            save_file(part, str(out_dir / name), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, group in zip(names, groups) for k in group},
        }
        (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")

    # --- config ----------------------------------------------------------------------------------
    config = original_config_from_hf(hf_config)
    if dtype is not None:
        dtype_name = str(dtype).replace("torch.", "")
        config["torch_dtype"] = dtype_name
        config["language_config"]["torch_dtype"] = dtype_name
    _write_json(out_dir / "config.json", config)

    # --- tokenizer / processor files, as the original repo has them -----------------------------
    shutil.copyfile(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    v = hf_config["vision_config"]
    mean = [0.5, 0.5, 0.5]
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "background_color": [int(x * 255) for x in mean],
            "do_normalize": True,
            "image_mean": mean,
            "image_processor_type": "VLMImageProcessor",
            "image_size": v["image_size"],
            "image_std": [0.5, 0.5, 0.5],
            "min_size": 14,
            "processor_class": "VLChatProcessor",
            "rescale_factor": 0.00392156862745098,
        },
    )
    _write_json(
        out_dir / "processor_config.json",
        {
            "add_special_token": False,
            "ignore_id": -100,
            "image_tag": JANUS_IMAGE_TOKEN,
            "mask_prompt": True,
            "num_image_tokens": v["num_image_tokens"],
            "processor_class": "VLChatProcessor",
            "sft_format": "deepseek",
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": JANUS_ADDITIONAL_SPECIAL_TOKENS,
            "bos_token": JANUS_BOS,
            "eos_token": JANUS_EOS,
            "pad_token": JANUS_PAD,
        },
    )

    def added(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": added(JANUS_BOS),
            "clean_up_tokenization_spaces": False,
            "eos_token": added(JANUS_EOS),
            "legacy": True,
            "model_max_length": 16384,
            "pad_token": added(JANUS_PAD),
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizerFast",
            "unk_token": None,
            "use_default_system_prompt": True,
        },
    )
    return out_dir


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
