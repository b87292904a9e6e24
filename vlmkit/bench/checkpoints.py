"""Random-weight checkpoints of the benchmarked architectures, written by ``transformers`` itself.

Sizes: ``tiny`` (builds and runs in seconds; for smoke tests) and ``real`` (the shapes of
Janus-Pro-1B and LLaVA-OneVision-Qwen2-0.5B). Weights are transformers' random initialisation
(timing does not depend on their values); the tokenizer is a small BPE with the real special tokens,
while the model's vocabulary keeps its real size. Built once and kept under the cache folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from .tokenizer import build_tokenizer

FORMAT_VERSION = 1  # bump when what is written changes, so stale cached checkpoints are rebuilt

# The chat template of the deepseek-community/Janus-Pro-* checkpoints (transformers'
# convert_janus_weights_to_hf.py CHAT_TEMPLATE), as the test builder writes it.
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%set i=0%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: {%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}"
    "{%endif%}{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)
JANUS_BOS, JANUS_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
JANUS_PAD = "<\uff5c\u2581pad\u2581\uff5c>"
JANUS_SPECIAL = [JANUS_BOS, JANUS_EOS, JANUS_PAD, "<begin_of_image>", "<end_of_image>", "<image_placeholder>",
                 "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>",
                 "<|Assistant|>"]

ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ONEVISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# Per size: (LM, vision tower, VQ/projector) settings. "real" = Janus-Pro-1B / LLaVA-OneVision-0.5B.
JANUS_SIZES = {
    "tiny": dict(text=dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
                 vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
                 vq=dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 2],
                         latent_channels=32, num_res_blocks=1)),
    "real": dict(text=dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384),
                 vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                             patch_size=16),
                 vq=dict(embed_dim=8, num_embeddings=16384, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4],
                         latent_channels=256, num_res_blocks=2)),
}
ONEVISION_SIZES = {
    "tiny": dict(text=dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                           tie_word_embeddings=True),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=42, patch_size=8)),
    "real": dict(text=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           tie_word_embeddings=True),
                 vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                             image_size=384, patch_size=14)),
}


def checkpoint(family: str, size: str, cache_dir: Path) -> Path:
    """The folder of a ``family`` ("janus", "llava_onevision") checkpoint of ``size``, built if missing."""
    folder = Path(cache_dir).expanduser() / f"{family}-{size}-v{FORMAT_VERSION}"
    if (folder / ".complete").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted build
    builder = {"janus": _build_janus, "llava_onevision": _build_onevision}[family]
    builder(folder, (JANUS_SIZES if family == "janus" else ONEVISION_SIZES)[size])
    (folder / ".complete").write_text("ok\n")
    return folder


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _random_model(model_class, config):
    """transformers' own random initialisation, straight in bf16 (the real sizes would need 8 GB in fp32)."""
    torch.manual_seed(0)
    config.dtype = torch.bfloat16
    with _default_dtype(torch.bfloat16):
        return model_class(config).eval()


def _build_janus(folder: Path, size: dict) -> None:
    from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerFast)
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    folder.mkdir(parents=True)
    build_tokenizer(folder, special_tokens=JANUS_SPECIAL, bos=JANUS_BOS, eos=JANUS_EOS, pad=JANUS_PAD)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token=JANUS_BOS, eos_token=JANUS_EOS, pad_token=JANUS_PAD,
        unk_token=None, model_max_length=16384, padding_side="left", clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in JANUS_SPECIAL}
    text, vision, vq = dict(size["text"]), size["vision"], size["vq"]
    text["vocab_size"] = text["vocab_size"] or (len(tokenizer) + 63) // 64 * 64
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    config = JanusConfig(
        text_config=LlamaConfig(**text, bos_token_id=ids[JANUS_BOS], eos_token_id=ids[JANUS_EOS],
                                pad_token_id=ids[JANUS_PAD], tie_word_embeddings=False),
        vision_config=JanusVisionConfig(**vision, projection_dim=text["hidden_size"], num_image_tokens=image_tokens),
        vq_config=JanusVQVAEConfig(**vq, projection_dim=text["hidden_size"], image_token_embed_dim=text["hidden_size"],
                                   num_patches=vision["image_size"] // vision["patch_size"]),
        image_token_id=ids["<image_placeholder>"], tie_word_embeddings=False)
    model = _random_model(JanusForConditionalGeneration, config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[JANUS_BOS], eos_token_id=ids[JANUS_EOS], pad_token_id=ids[JANUS_PAD], guidance_scale=5,
        temperature=1, generation_kwargs={"boi_token_id": ids["<begin_of_image>"]})
    model.generation_config._from_model_config = False
    model.save_pretrained(folder)
    image_processor = JanusImageProcessorPil(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=14, resample=3, do_pad=True,
        size={"height": vision["image_size"], "width": vision["image_size"]})
    JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=JANUS_CHAT_TEMPLATE,
                   use_default_system_prompt=True, num_image_tokens=image_tokens).save_pretrained(folder)


def _build_onevision(folder: Path, size: dict) -> None:
    from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    folder.mkdir(parents=True)
    endoftext, im_end = "<|endoftext|>", "<|im_end|>"
    build_tokenizer(folder, special_tokens=ONEVISION_SPECIAL, bos=None, eos=im_end, pad=endoftext, add_bos=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token=None, eos_token=im_end, pad_token=endoftext,
        unk_token=None, model_max_length=32768, clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ONEVISION_SPECIAL}
    text, vision = dict(size["text"]), size["vision"]
    text["vocab_size"] = text["vocab_size"] or (len(tokenizer) + 63) // 64 * 64
    side = vision["image_size"]
    pinpoints = [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]  # anyres_max_9
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False).to_dict(),
        text_config=Qwen2Config(**text, rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=ids[endoftext],
                                eos_token_id=ids[im_end], pad_token_id=ids[endoftext]).to_dict(),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=text["tie_word_embeddings"])
    model = _random_model(LlavaOnevisionForConditionalGeneration, config)
    model.generation_config = GenerationConfig(bos_token_id=ids[endoftext], eos_token_id=ids[im_end],
                                               pad_token_id=ids[endoftext])
    model.save_pretrained(folder)
    LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=pinpoints, do_pad=True, size={"height": side, "width": side}, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, resample=3, do_convert_rgb=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    grid = side // vision["patch_size"]
    (folder / "chat_template.jinja").write_text(ONEVISION_CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": grid * grid,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}, indent=2) + "\n")
