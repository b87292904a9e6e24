"""Tiny checkpoints rewritten into the file sets real Hugging Face repos hold.

The builders write what transformers 5.23's ``save_pretrained`` writes today. The real repos were written
by older transformers versions (and by their authors), so they hold other files and keys; each function
here takes a tiny folder made by a builder and rewrites it the way one family of real repos has it.
What each real repo holds (from the repos' file listings and the transformers versions that wrote them):

* ``llava-hf/llava-onevision-qwen2-{0.5b,7b}-{ov,si}-hf`` (transformers 4.45.0.dev0): config.json with
  ``torch_dtype``, ``transformers_version``, ``architectures``, ``ignore_index``,
  ``use_image_newline_parameter``, the full ``image_grid_pinpoints`` list, ``vision_aspect_ratio``,
  ``vision_feature_layer``; nested configs as 4.x's ``to_diff_dict`` wrote them (only the keys that
  differ from the class defaults, plus ``model_type``; ``text_config`` with ``_name_or_path``,
  ``architectures``, ``torch_dtype`` and ``rope_theta`` at its top); weights under
  ``vision_tower.vision_model.``/``language_model.model.``/``language_model.lm_head.`` (the 0.5b ties the
  head: no head tensor, ``tie_word_embeddings`` in ``text_config``); 0.5b ``model.safetensors``, 7b four
  shards with ``model.safetensors.index.json``; preprocessor_config.json (``image_processor_type``,
  ``processor_class``, ``do_convert_rgb``, ``resample`` 3, ``size`` {"height", "width"}, ``do_pad``,
  ``image_grid_pinpoints``), video_preprocessor_config.json, processor_config.json (``image_token``,
  ``num_image_tokens``, ``processor_class``, ``video_token``, ``vision_feature_select_strategy``),
  chat_template.json (later commits: chat_template.jinja); tokenizer_config.json with
  ``added_tokens_decoder``, ``additional_special_tokens``, ``tokenizer_class`` "Qwen2Tokenizer" and
  Qwen2-Instruct's own (text-only) ``chat_template``; special_tokens_map.json, added_tokens.json,
  vocab.json, merges.txt; generation_config.json with ``_from_model_config``.
* ``deepseek-community/Janus-Pro-{1B,7B}`` (transformers 4.53.0.dev0): config.json with ``torch_dtype``,
  ``rope_theta``/``rope_scaling`` in ``text_config``; preprocessor_config.json (``JanusImageProcessor``,
  ``min_size``, ``background_color``, ``size`` {"height", "width"}), processor_config.json
  (``num_image_tokens``, ``processor_class``, ``use_default_system_prompt``), chat_template.jinja (or
  .json), tokenizer_config.json of a ``LlamaTokenizerFast`` with ``extra_special_tokens`` as a dict,
  special_tokens_map.json; 7B in shards.
* ``HuggingFaceM4/idefics-9b`` and ``-instruct`` (transformers 4.28.0.dev0): config.json with ``torch_dtype``,
  a short ``vision_config`` (``embed_dim``, ``vision_model_name``, ``model_type`` "idefics"), a
  ``perceiver_config``, no rope keys; two safetensors shards and an index; preprocessor_config.json
  with ``image_size``, ``image_mean``, ``image_std``, ``image_num_channels`` only (no ``do_*``, no
  ``size``, no ``resample``); a ``LlamaTokenizer`` tokenizer_config.json with ``AddedToken`` dicts and
  no image tokens, which are named in special_tokens_map.json and added_tokens.json; no chat template.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["write_onevision_hub_layout", "write_janus_community_layout", "write_idefics_hub_layout"]

# what transformers 4.x's PretrainedConfig.to_dict spelled out in every config (the generation keys
# among them were later moved to generation_config.json)
OLD_PRETRAINED_DEFAULTS = {
    "_name_or_path": "", "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False,
}


# --- shared rewrites ---------------------------------------------------------------------------

def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _old_rope(section: dict) -> dict:
    """``rope_parameters`` as 4.x wrote it: ``rope_theta`` (and ``rope_scaling``) at the section's top."""
    section = dict(section)
    rope = section.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        section["rope_theta"] = rope["rope_theta"]
    section["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return section


def _diff(section: dict, defaults: dict, keep: tuple = ("model_type",)) -> dict:
    """The keys of ``section`` whose values differ from ``defaults`` (4.x's ``to_diff_dict``)."""
    return {k: v for k, v in section.items() if k in keep or k not in defaults or defaults[k] != v}


def _spelled_out(section: dict) -> dict:
    """A nested config with every PretrainedConfig default written, as 4.x's ``to_dict`` did."""
    return {**OLD_PRETRAINED_DEFAULTS, **section}


def _write_weights(state: dict, out: Path, shards: int) -> None:
    """``model.safetensors``, or ``shards`` files ``model-0000i-of-0000n.safetensors`` and an index with
    ``metadata.total_size``, tensors split in name order (as ``save_pretrained`` fills shards)."""
    from safetensors.torch import save_file

    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        part = names[index * per_shard:(index + 1) * per_shard]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(state[n].numel() * state[n].element_size() for n in part)
    _write(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _added_tokens(src: Path) -> list[dict]:
    return _read(src / "tokenizer.json")["added_tokens"]


def _added_tokens_decoder(src: Path) -> dict:
    return {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in _added_tokens(src)}


def _vocab_and_merges(src: Path, out: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, as the slow BPE tokenizers saved them."""
    model = _read(src / "tokenizer.json")["model"]
    _write(out / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _old_generation_config(src: Path, version: str, **extra) -> dict:
    config = _read(src / "generation_config.json")
    config = {k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {"_from_model_config": True, **config, **extra, "transformers_version": version}


# --- LLaVA-OneVision -----------------------------------------------------------------------------

# Qwen2-Instruct's own chat template, which the llava-hf repos keep in tokenizer_config.json: text only,
# with a default system turn; the processor's template (chat_template.json) is the one to use.
QWEN2_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_onevision_hub_layout(src: str | os.PathLike, out: str | os.PathLike, *, shards: int = 1,
                               template_file: str = "chat_template.json", long_text_config: bool = False,
                               tie_in_text_config_only: bool = False, shortest_edge_size: bool = False) -> Path:
    """``src`` (a ``build_tiny_llava_onevision`` folder) as the llava-hf repos hold it (see the module
    docstring). ``shards``: weight files (7b: 4); ``template_file``: "chat_template.json" or
    "chat_template.jinja"; ``long_text_config``: text_config with every 4.x default spelled out instead of
    the short diff; ``tie_in_text_config_only``: a tied head named only in text_config (0.5b's config);
    ``shortest_edge_size``: the image processor's size as {"shortest_edge": N} with a ``crop_size`` beside it
    (how llava-hf's older LLaVA image processor configs spell it)."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, SiglipVisionConfig

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _read(src / "config.json")
    text = _old_rope(config["text_config"])
    if long_text_config:
        text = _spelled_out(text)
    else:
        text = _diff(text, _old_rope(Qwen2Config().to_dict()))
    text.update(_name_or_path="Qwen/Qwen2-7B-Instruct", architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
    text.pop("layer_types", None)  # written since transformers 4.53
    vision = _diff(config["vision_config"], SiglipVisionConfig().to_dict())
    tied = config["tie_word_embeddings"]
    top = {k: v for k, v in config.items() if k not in ("dtype", "multimodal_projector_bias", "text_config",
                                                         "vision_config", "transformers_version")}
    top.update(ignore_index=-100, use_image_newline_parameter=True, torch_dtype="float16",
               text_config=text, vision_config=vision, transformers_version="4.45.0.dev0")
    if tie_in_text_config_only:
        top.pop("tie_word_embeddings")
        text["tie_word_embeddings"] = tied
    _write(out / "config.json", dict(sorted(top.items())))
    _write(out / "generation_config.json", _old_generation_config(src, "4.45.0.dev0"))

    state = load_file(str(src / "model.safetensors"))
    state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
             for k, v in state.items()}
    if tied:
        state.pop("language_model.lm_head.weight", None)
    _write_weights(state, out, shards)

    processor = _read(src / "processor_config.json")
    image = {k: v for k, v in processor["image_processor"].items()}
    image.update(image_processor_type="LlavaOnevisionImageProcessor", processor_class="LlavaOnevisionProcessor")
    if shortest_edge_size:
        side = image["size"]["height"]
        image.update(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=False)
    video = {k: v for k, v in processor["video_processor"].items()
             if k not in ("video_processor_type", "do_sample_frames", "fps", "num_frames", "return_metadata")}
    video.update(image_processor_type="LlavaOnevisionVideoProcessor", processor_class="LlavaOnevisionProcessor")
    _write(out / "preprocessor_config.json", dict(sorted(image.items())))
    _write(out / "video_preprocessor_config.json", dict(sorted(video.items())))
    _write(out / "processor_config.json", {"image_token": "<image>", "num_image_tokens": processor["num_image_tokens"],
                                           "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
                                           "vision_feature_select_strategy": "full"})
    template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if template_file == "chat_template.json":
        _write(out / "chat_template.json", {"chat_template": template})
    else:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")

    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    _vocab_and_merges(src, out)
    tokenizer = _read(src / "tokenizer_config.json")
    _write(out / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(src),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN2_TEXT_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer["eos_token"], "errors": "replace", "model_max_length": tokenizer["model_max_length"],
        "pad_token": tokenizer["pad_token"], "padding_side": "right", "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
               "eos_token": {"content": tokenizer["eos_token"], "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False},
               "pad_token": {"content": tokenizer["pad_token"], "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False}}
    _write(out / "special_tokens_map.json", special)
    _write(out / "added_tokens.json", {t["content"]: t["id"] for t in _added_tokens(src)})
    return out


# --- Janus (deepseek-community) ------------------------------------------------------------------

def write_janus_community_layout(src: str | os.PathLike, out: str | os.PathLike, *, shards: int = 1,
                                 template_file: str = "chat_template.jinja", short_config: bool = False) -> Path:
    """``src`` (a ``build_tiny_janus`` folder) as the deepseek-community Janus-Pro repos hold it (see the
    module docstring). ``shards``: weight files (7B: 2); ``template_file``: "chat_template.jinja",
    "chat_template.json" or "tokenizer_config.json" (a ``chat_template`` key there); ``short_config``: the
    nested configs as ``to_diff_dict`` writes them (only the keys that differ from the class defaults)."""
    from safetensors.torch import load_file
    from transformers import JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _read(src / "config.json")
    top = {k: v for k, v in config.items() if k not in ("dtype", "transformers_version")}
    text, vision, vq = _old_rope(config["text_config"]), dict(config["vision_config"]), dict(config["vq_config"])
    if short_config:
        text = _diff(text, _old_rope(LlamaConfig().to_dict()))
        vision = _diff(vision, JanusVisionConfig().to_dict())
        vq = _diff(vq, JanusVQVAEConfig().to_dict())
    top["text_config"] = {**text, "torch_dtype": "bfloat16"}
    top["vision_config"] = {**vision, "select_layer": -1, "vision_feature_select_strategy": "default"}
    top["vq_config"] = vq
    top.update(_name_or_path="deepseek-community/Janus-Pro-1B", torch_dtype="bfloat16",
               transformers_version="4.53.0.dev0")
    _write(out / "config.json", dict(sorted(top.items())))
    generation = _read(src / "generation_config.json")
    generation.update(_from_model_config=True, transformers_version="4.53.0.dev0")
    _write(out / "generation_config.json", generation)
    _write_weights(load_file(str(src / "model.safetensors")), out, shards)

    processor = _read(src / "processor_config.json")
    image = dict(processor.pop("image_processor"))
    image.update(do_convert_rgb=True, processor_class="JanusProcessor")
    image.pop("do_pad", None)  # added to the class later
    _write(out / "preprocessor_config.json", dict(sorted(image.items())))
    _write(out / "processor_config.json", {"num_image_tokens": processor["num_image_tokens"],
                                           "processor_class": "JanusProcessor", "use_default_system_prompt": False})
    template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer = _read(src / "tokenizer_config.json")
    extra = {name: tokenizer[name] for name in ("image_token", "boi_token", "eoi_token")}
    old_tokenizer = {
        "added_tokens_decoder": _added_tokens_decoder(src),
        "additional_special_tokens": [t["content"] for t in _added_tokens(src)
                                      if t["content"] not in (tokenizer["bos_token"], tokenizer["eos_token"],
                                                              tokenizer["pad_token"])],
        "bos_token": tokenizer["bos_token"], "clean_up_tokenization_spaces": False, "eos_token": tokenizer["eos_token"],
        "extra_special_tokens": extra, "legacy": True, "model_max_length": tokenizer["model_max_length"],
        "pad_token": tokenizer["pad_token"], "padding_side": "left", "processor_class": "JanusProcessor",
        "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": False}
    if template_file == "tokenizer_config.json":
        old_tokenizer["chat_template"] = template
    elif template_file == "chat_template.json":
        _write(out / "chat_template.json", {"chat_template": template})
    else:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write(out / "tokenizer_config.json", old_tokenizer)
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    _write(out / "special_tokens_map.json", {
        "additional_special_tokens": old_tokenizer["additional_special_tokens"], "bos_token": tokenizer["bos_token"],
        "eos_token": tokenizer["eos_token"], "pad_token": tokenizer["pad_token"], **extra})
    return out


# --- IDEFICS --------------------------------------------------------------------------------------

def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_idefics_hub_layout(src: str | os.PathLike, out: str | os.PathLike, *, shards: int = 2,
                             template_file: str | None = None, short_config: bool = False) -> Path:
    """``src`` (a ``build_tiny_idefics`` folder) as the HuggingFaceM4 idefics-9b(-instruct) repos hold it
    (see the module docstring). ``template_file``: None (the repos have no chat template),
    "tokenizer_config.json" or "chat_template.json"; ``short_config``: the top level without the keys
    that equal IdeficsConfig's defaults (``to_diff_dict``)."""
    from safetensors.torch import load_file
    from transformers import IdeficsConfig
    from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _read(src / "config.json")
    vision = _diff(config["vision_config"], IdeficsVisionConfig().to_dict())
    vision.update(model_type="idefics", vision_model_name="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    perceiver = {**config["perceiver_config"], "model_type": "idefics"}
    top = {k: v for k, v in config.items() if k not in ("dtype", "rope_parameters", "transformers_version")}
    top.update(_name_or_path="HuggingFaceM4/idefics-9b", torch_dtype="bfloat16", transformers_version="4.28.0.dev0",
               vision_config=vision, perceiver_config=perceiver, max_sequence_length=2048,
               word_embed_proj_dim=config["hidden_size"])
    if short_config:
        top = _diff(top, {k: v for k, v in IdeficsConfig().to_dict().items()
                          if k not in ("vision_config", "perceiver_config")})
    _write(out / "config.json", dict(sorted(top.items())))
    _write(out / "generation_config.json", _old_generation_config(src, "4.28.0.dev0"))
    _write_weights(load_file(str(src / "model.safetensors")), out, shards)

    image = _read(src / "processor_config.json")["image_processor"]
    _write(out / "preprocessor_config.json", {
        "image_mean": image["image_mean"], "image_num_channels": 3, "image_processor_type": "IdeficsImageProcessor",
        "image_size": image["image_size"], "image_std": image["image_std"], "processor_class": "IdeficsProcessor"})

    tokenizer = _read(src / "tokenizer_config.json")
    old_tokenizer = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token(tokenizer["bos_token"]),
                     "clean_up_tokenization_spaces": False, "eos_token": _added_token(tokenizer["eos_token"]),
                     "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
                     "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token(tokenizer["unk_token"])}
    template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if template_file == "tokenizer_config.json":
        old_tokenizer["chat_template"] = template
    elif template_file == "chat_template.json":
        _write(out / "chat_template.json", {"chat_template": template})
    _write(out / "tokenizer_config.json", old_tokenizer)
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    extra = tokenizer["extra_special_tokens"]
    _write(out / "special_tokens_map.json", {"additional_special_tokens": extra, "bos_token": tokenizer["bos_token"],
                                             "eos_token": tokenizer["eos_token"], "pad_token": tokenizer["pad_token"],
                                             "unk_token": tokenizer["unk_token"]})
    ids = {t["content"]: t["id"] for t in _added_tokens(src)}
    _write(out / "added_tokens.json", {token: ids[token] for token in extra})
    return out
