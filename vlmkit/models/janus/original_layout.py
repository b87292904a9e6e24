"""DeepSeek's original Janus / Janus-Pro layout (``model_type: multi_modality``) mapped onto the same
modules as the transformers layout: config sections, weight names, prompt format and preprocessing.

Sizes the original config leaves out come from its fixed defaults: LLaMA's for the text side (the
Pro-7B config lists only layers, vocab and positions), SigLIP-L/16@384 for the vision tower, VQ-16
for the image tokenizer. Token ids come from the checkpoint's tokenizer, never from constants."""

import re

import torch

from ...configs import json_type
from ...errors import CheckpointError
from ...io.checkpoint import WeightLayout
from ...io.tokenizer import added_token_id
from ...nn.decoder import DecoderConfig
from .config import JanusConfig, JanusVisionConfig, JanusVQVAEConfig
from .image_processing import JanusImageProcessor

# SigLIP towers by the original's model_name: (width, layers, heads, patch, image size)
_SIGLIP_TOWERS = {"siglip_large_patch16_384": (1024, 24, 16, 16, 384)}
_ROLES = {"deepseek": ("<|User|>", "<|Assistant|>"), "deepseek_old": ("User", "Assistant")}
SEPARATORS = ("\n\n", "<\uff5cend\u2581of\u2581sentence\uff5c>")


def _params(config: dict, section: str) -> dict:
    value = config.get(section) or {}
    params = value.get("params") if isinstance(value, dict) else value
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"config.json: {section}.params must be a JSON object, got {json_type(params)}; "
                              f"fix that section of the file")
    return params or {}


def _read(params: dict, section: str, key: str, default, kind: type = int):
    """``params[key]`` (``default`` when absent), refused when it is not of ``kind``, naming the key."""
    value = params.get(key, default)
    if value is None:
        return default
    if not (isinstance(value, kind) or kind is float and isinstance(value, int)) or isinstance(value, bool):
        raise CheckpointError(f"config.json: {section}.params.{key} is {json_type(value)} ({value!r}), but it "
                              f"must be {'an integer' if kind is int else 'a number'}; fix the value in the file")
    return value


# where the original config.json holds the sizes JanusConfig.check_sizes compares
ORIGINAL_KEY_NAMES = {"vision_config.projection_dim": "config.json: aligner_config.params.n_embed",
                      "vq_config.projection_dim": "config.json: gen_aligner_config.params.n_embed",
                      "vq_config.image_token_embed_dim": "config.json: gen_head_config.params.image_token_embed",
                      "text_config.hidden_size": "config.json: language_config.hidden_size",
                      "vision_config.hidden_size": "config.json: vision_config.params.width",
                      "vision_config.num_attention_heads": "config.json: vision_config.params.heads"}


def original_config_and_layout(folder, raw: dict) -> tuple[JanusConfig, WeightLayout]:
    """(JanusConfig, WeightLayout) for an original-layout folder."""
    missing = [s for s in ("language_config", "vision_config", "aligner_config", "gen_vision_config",
                           "gen_aligner_config", "gen_head_config") if s not in raw]
    if missing:
        raise CheckpointError(f"{folder}: a multi_modality config without {', '.join(missing)} is not Janus "
                              "(JanusFlow and DeepSeek-VL v1 share this model_type and are not supported)")
    vision, aligner = _params(raw, "vision_config"), _params(raw, "aligner_config")
    width, layers, heads, patch, size = _SIGLIP_TOWERS.get(str(vision.get("model_name")),
                                                           _SIGLIP_TOWERS["siglip_large_patch16_384"])
    v, a = "vision_config", "aligner_config"
    vision_config = JanusVisionConfig(
        hidden_size=_read(vision, v, "width", width), num_hidden_layers=_read(vision, v, "layers", layers),
        num_attention_heads=_read(vision, v, "heads", heads), patch_size=_read(vision, v, "patch_size", patch),
        image_size=_read(vision, v, "image_size", size), mlp_ratio=_read(vision, v, "mlp_ratio", 4.0, float),
        projection_dim=_read(aligner, a, "n_embed", 2048), depth=_read(aligner, a, "depth", 2))
    vision_config.num_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    vq, gen_aligner, gen_head = (_params(raw, s) for s in ("gen_vision_config", "gen_aligner_config",
                                                          "gen_head_config"))
    q, ga, gh = "gen_vision_config", "gen_aligner_config", "gen_head_config"
    multipliers = vq.get("encoder_ch_mult", [1, 1, 2, 2, 4])
    if not isinstance(multipliers, list) or not all(isinstance(m, int) and m > 0 for m in multipliers):
        raise CheckpointError(f"config.json: {q}.params.encoder_ch_mult must be a list of positive integers, got "
                              f"{multipliers!r}; fix the value in the file")
    vq_config = JanusVQVAEConfig(
        embed_dim=_read(vq, q, "n_embed", 8), num_embeddings=_read(vq, q, "image_token_size", 16384),
        base_channels=_read(vq, q, "ch", 128), channel_multiplier=list(multipliers),
        latent_channels=_read(vq, q, "z_channels", 256), num_res_blocks=_read(vq, q, "num_res_blocks", 2),
        projection_dim=_read(gen_aligner, ga, "n_embed", 2048), num_hidden_layers=_read(gen_aligner, ga, "depth", 2),
        image_token_embed_dim=_read(gen_head, gh, "image_token_embed", 2048))
    special = _special_token_ids(folder)
    text_config = DecoderConfig.from_dict(raw["language_config"], "config.json: language_config", model_type="llama",
                                          **special)
    image_token_id = added_token_id(folder, "<image_placeholder>")
    if image_token_id is None:
        raise CheckpointError(f"{folder}: the tokenizer has no <image_placeholder> token")
    config = JanusConfig(text_config, vision_config, vq_config, image_token_id=image_token_id)
    config._key_names = ORIGINAL_KEY_NAMES  # what check_sizes calls these sizes
    return config, WeightLayout(rename_original_weight, ignore=(r"attn_pool\.", r"quantize\.codebook_used"),
                                optional=(r"^lm_head\.weight$",))


def _special_token_ids(folder) -> dict:
    from ...io.checkpoint import read_json
    from ...io.tokenizer import token_text

    ids = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        config = read_json(path) if path.is_file() else {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = token_text(config.get(key))
            if token and f"{key}_id" not in ids and added_token_id(folder, token) is not None:
                ids[f"{key}_id"] = added_token_id(folder, token)
    return ids


_VISION = "vision_model.vision_tower."
_SIMPLE_RENAMES = [
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm([12])\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.(\d+)\.res\.", r"model.vqmodel.encoder.down.\1.block."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.(\d+)\.", r"model.vqmodel.encoder.down.\1."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.(\d+)\.res\.", r"model.vqmodel.decoder.up.\1.block."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.(\d+)\.", r"model.vqmodel.decoder.up.\1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.0\.", r"model.vqmodel.\1.mid.block_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.1\.", r"model.vqmodel.\1.mid.attn_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.2\.", r"model.vqmodel.\1.mid.block_2."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def rename_original_weight(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One original-layout tensor as the (name, tensor) pairs of our modules."""
    if name == _VISION + "pos_embed":
        return [("model.vision_model.embeddings.position_embedding.weight", tensor.squeeze(0))]
    qkv = re.match(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
    if qkv:
        layer, kind = qkv.groups()
        prefix = f"model.vision_model.encoder.layers.{layer}.self_attn."
        return [(f"{prefix}{p}_proj.{kind}", part) for p, part in zip("qkv", tensor.chunk(3, dim=0))]
    aligner = re.match(r"^(gen_aligner|aligner)\.layers\.(\d+)\.(.+)$", name)
    if aligner:  # Sequential(Linear, GELU, Linear, ...): index 0 is fc1, index 2k is hidden_layers.(k-1)
        module, index, rest = aligner.group(1), int(aligner.group(2)), aligner.group(3)
        target = "model.generation_aligner" if module == "gen_aligner" else "model.aligner"
        layer = "fc1" if index == 0 else f"hidden_layers.{index // 2 - 1}"
        return [(f"{target}.{layer}.{rest}", tensor)]
    for pattern, replacement in _SIMPLE_RENAMES:
        if re.search(pattern, name):
            return [(re.sub(pattern, replacement, name, count=1), tensor)]
    return [(name, tensor)]


def deepseek_chat_template(user: str, assistant: str) -> str:
    """A chat template producing the original conversation format: ``{user}: ...\\n\\n{assistant}:``
    with images as ``<image_placeholder>`` lines, stripped contents and the original separators."""
    return (
        "{%- set seps = ['" + SEPARATORS[0].replace("\n", "\\n") + "', '" + SEPARATORS[1] + "'] -%}"
        "{%- for message in messages -%}"
        "{%- set role = message['role'] | lower -%}"
        "{%- if role == 'user' %}" + user + ": {% elif role == 'assistant' %}" + assistant + ":"
        "{%- if not (loop.last and not add_generation_prompt and message['content'][0]['type'] == 'text'"
        " and message['content'][0]['text'] == '') %} {% endif -%}"
        "{%- else %}{{ message['role'] | capitalize }}: {% endif -%}"
        "{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'image' -%}"
        "{%- if not loop.first %}{{ '\\n' }}{% endif %}<image_placeholder>{% if not loop.last %}{{ '\\n' }}{% endif -%}"
        "{%- elif block['type'] == 'text' -%}"
        "{%- set text = block['text'] -%}"
        "{%- if loop.first %}{% set text = text.lstrip() %}{% endif -%}"
        "{%- if loop.last %}{% set text = text.rstrip() %}{% endif -%}"
        "{%- if not loop.first and message['content'][loop.index0 - 1]['type'] == 'text' %} {% endif -%}"
        "{{ text }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if not loop.last or add_generation_prompt -%}"
        "{{ seps[0] if role == 'user' else seps[1] }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}" + assistant + ":{% endif -%}"
    )


def original_processor_settings(folder, model_config: dict, processor_config: dict, image_config: dict,
                                tokenizer) -> dict:
    """Keyword arguments for ``JanusProcessor`` from an original-layout folder."""
    image_processor = JanusImageProcessor.from_config(image_config)
    image_processor.resize_rounding = "floor"  # the original processor truncates the resized side
    vision = _params(model_config, "vision_config")
    patch = vision.get("patch_size", 16)
    tokens = int(processor_config.get("num_image_tokens") or (image_processor.size // patch) ** 2)
    user, assistant = _ROLES.get(processor_config.get("sft_format", "deepseek"), _ROLES["deepseek"])
    return dict(image_processor=image_processor, tokenizer=tokenizer,
                chat_template=deepseek_chat_template(user, assistant),
                use_default_system_prompt=bool(processor_config.get("use_default_system_prompt", True)),
                num_image_tokens=tokens)
