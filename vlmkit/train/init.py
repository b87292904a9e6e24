"""A fresh Janus model from sizes: the transformers-layout ``config.json`` dict, and the model built
from it with random weights (``from_pretrained`` builds on the meta device and loads; training
starts here instead)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..models.janus.config import JanusConfig
from ..models.janus.modeling import JanusForConditionalGeneration
from .recipe import ModelSizes


def janus_config_dict(sizes: ModelSizes, token_ids: dict[str, int], vocab_size: int,
                      patchwise_encoding: bool = False) -> dict:
    """The ``config.json`` of a Janus model of these sizes, with the keys transformers writes (and
    vlmkit's ``patchwise_encoding`` in ``vq_config`` when asked: see ``JanusVQVAE.latents``)."""
    num_image_tokens = (sizes.image_size // sizes.patch_size) ** 2
    latent_side = sizes.image_size // 2 ** (len(sizes.vq_channel_multiplier) - 1)
    if latent_side ** 2 != num_image_tokens:
        raise InputError(f"the VQ grid ({latent_side}x{latent_side}, from {len(sizes.vq_channel_multiplier)} levels) "
                         f"must have as many tokens as the vision tower's patch grid ({num_image_tokens}): "
                         f"Janus uses one side for both")
    text = {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size, "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads, "num_key_value_heads": sizes.num_kv_heads,
        "head_dim": sizes.hidden_size // sizes.num_heads, "hidden_act": "silu",
        "max_position_embeddings": sizes.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": token_ids["bos"], "eos_token_id": token_ids["eos"], "pad_token_id": token_ids["pad"],
    }
    vision = {
        "model_type": "janus_vision_model", "hidden_size": sizes.vision_hidden_size,
        "num_hidden_layers": sizes.vision_layers, "num_attention_heads": sizes.vision_heads, "num_channels": 3,
        "image_size": sizes.image_size, "patch_size": sizes.patch_size, "mlp_ratio": 4.0, "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout_rate": 0.0,
        "projection_dropout": 0.0, "use_qk_norm": False, "projection_dim": sizes.hidden_size, "depth": 2,
        "num_image_tokens": num_image_tokens, "initializer_range": 0.02,
    }
    vq = {
        "model_type": "janus_vqgan", "embed_dim": sizes.vq_embed_dim, "num_embeddings": sizes.vq_codebook_size,
        "double_latent": False, "latent_channels": sizes.vq_latent_channels, "in_channels": 3, "out_channels": 3,
        "base_channels": sizes.vq_base_channels, "channel_multiplier": list(sizes.vq_channel_multiplier),
        "num_res_blocks": sizes.vq_res_blocks, "dropout": 0.0, "projection_dim": sizes.hidden_size,
        "num_hidden_layers": 2, "hidden_act": "gelu", "image_token_embed_dim": sizes.hidden_size,
        "num_patches": latent_side, "initializer_range": 0.02,
    }
    if patchwise_encoding:
        vq["patchwise_encoding"] = True
    return {
        "architectures": ["JanusForConditionalGeneration"], "model_type": "janus", "dtype": "float32",
        "image_token_id": token_ids["image"], "tie_word_embeddings": False,
        "text_config": text, "vision_config": vision, "vq_config": vq,
    }


def init_weights(model: JanusForConditionalGeneration, seed: int) -> None:
    """Deterministic initial weights: GPT-style N(0, 0.02) for linear layers and embeddings of the
    transformer parts (residual output projections scaled down by depth), zero biases, unit norms;
    the VQ-VAE's convolutions keep PyTorch's default (Kaiming) init, redrawn from ``seed``, except the
    last layer of each residual branch, which starts at zero: every block begins as the identity, and
    the autoencoder reconstructs sharper for the same compute (32% vs 23.5% of scenes in our runs)."""
    torch.manual_seed(seed)
    layers = model.config.text_config.num_hidden_layers
    residual_std = 0.02 / math.sqrt(2 * layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            in_vq = name.startswith("model.vqmodel")
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj", "projection_layer", "fc2")) else 0.02
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                if in_vq:
                    module.weight.normal_(0.0, 1.0)  # the codebook: only directions matter (L2-normalised)
                else:
                    module.weight.normal_(0.0, 0.02)
            elif isinstance(module, nn.Conv2d):
                if in_vq and name.endswith((".conv2", ".proj_out")):
                    module.weight.zero_()
                    module.bias.zero_()
                else:
                    module.reset_parameters()
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.reset_parameters()


def new_model(config_dict: dict, seed: int) -> JanusForConditionalGeneration:
    """A randomly initialised model for a ``config.json`` dict, in float32 on the CPU."""
    config = JanusConfig.from_dict(config_dict)
    model = JanusForConditionalGeneration(config)
    init_weights(model, seed)
    model.has_generation_weights = True
    return model
