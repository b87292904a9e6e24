"""Tiny random IDEFICS checkpoints for tests, written by `transformers` itself.

`build_tiny_idefics(out_dir, use_resampler=...)` writes an `IdeficsForVisionText2Text` checkpoint and its
processor (tokenizer, PIL image processor) with `save_pretrained`, so transformers' classes are the
reference for everything vlmkit loads from it. Two variants cover the switches of the family:

* with the perceiver resampler: `additional_vocab_size=2` (the image tokens live in the decoupled
  embedding / LM head, as in idefics-9b), vector gates, `qk_layer_norms`, `qk_layer_norms_perceiver`,
  a cross-attention layer every 2 decoder layers, freeze exceptions;
* without it: one vocabulary, float gates, a cross-attention layer before every decoder layer.

The gates (`alpha_*`) start at zero in transformers, which would make cross-attention a no-op: they get
random values here, like every other weight, so the images really change the logits.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from vlmkit.bench.tokenizer import build_tokenizer

__all__ = [
    "IDEFICS_BOS", "IDEFICS_EOS", "IDEFICS_UNK", "IDEFICS_FAKE_TOKEN", "IDEFICS_IMAGE_TOKEN",
    "IDEFICS_END_OF_UTTERANCE", "IDEFICS_CHAT_TEMPLATE", "build_tiny_idefics",
]

IDEFICS_BOS, IDEFICS_EOS, IDEFICS_UNK = "<s>", "</s>", "<unk>"
IDEFICS_FAKE_TOKEN = "<fake_token_around_image>"
IDEFICS_IMAGE_TOKEN = "<image>"
IDEFICS_END_OF_UTTERANCE = "<end_of_utterance>"
# unk/bos/eos first (0, 1, 2 in the real vocabulary), then the end-of-utterance token, then the two image
# tokens last, so that with additional_vocab_size=2 exactly they fall in the decoupled range (32000, 32001
# in idefics-9b).
_SPECIAL_TOKENS = [IDEFICS_UNK, IDEFICS_BOS, IDEFICS_EOS, IDEFICS_END_OF_UTTERANCE, IDEFICS_FAKE_TOKEN,
                   IDEFICS_IMAGE_TOKEN]

# An instruct-style template in the idefics-9b-instruct prompt format ("User: ...<end_of_utterance>\n
# Assistant:"); each image block becomes the image token, where the user put it.
IDEFICS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image>"
    "{% elif block['type'] == 'text' %}{{ ' ' + block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, non-degenerate weights: matrices ~ N(0, 1/fan_in) (q/k 3x sharper), biases and
    norm scales random, gates, latents and the class embedding O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("alpha_"):
                new = 0.8 * torch.randn(p.shape, generator=gen)
            elif leaf in ("latents", "class_embedding"):
                new = torch.randn(p.shape, generator=gen)
            elif leaf == "bias":
                new = 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # LayerNorm / RMSNorm scales
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif "position_embedding" in name:
                new = 0.5 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name or "additional_embedding" in name:
                new = torch.randn(p.shape, generator=gen)
            else:
                gain = 3.0 if leaf == "weight" and name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                new = gain * torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(new.to(p.dtype))


def build_tiny_idefics(
    out_dir: str | os.PathLike,
    *,
    use_resampler: bool,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_num_layers: int = 2,
    vision_num_heads: int = 2,
    tokenizer_vocab_size: int = 600,
    padding_side: str = "left",
) -> Path:
    """Write a tiny random IDEFICS checkpoint + processor to `out_dir`; returns `out_dir`.

    Loadable with `IdeficsForVisionText2Text.from_pretrained(out_dir)` and
    `AutoProcessor.from_pretrained(out_dir, backend="pil")`. The chat template is saved too
    (transformers' IdeficsProcessor does not keep it when loading; vlmkit must)."""
    from transformers import GenerationConfig, IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers import PreTrainedTokenizerFast
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok_path = build_tokenizer(out_dir, special_tokens=_SPECIAL_TOKENS, bos=IDEFICS_BOS, eos=IDEFICS_EOS,
                               pad=None, unk=IDEFICS_UNK, vocab_size=tokenizer_vocab_size, add_bos=True, seed=seed)
    # As in the idefics-9b tokenizer: pad with <unk>; the image tokens and the end-of-utterance token
    # are additional special tokens (the processor looks for the latter there).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path), bos_token=IDEFICS_BOS, eos_token=IDEFICS_EOS, unk_token=IDEFICS_UNK,
        pad_token=IDEFICS_UNK, model_max_length=2048, padding_side=padding_side, clean_up_tokenization_spaces=False,
        additional_special_tokens=[IDEFICS_FAKE_TOKEN, IDEFICS_IMAGE_TOKEN, IDEFICS_END_OF_UTTERANCE],
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
    if use_resampler:
        vocab_size, additional = ids[IDEFICS_FAKE_TOKEN], 2
        assert ids[IDEFICS_IMAGE_TOKEN] == vocab_size + 1 == len(tokenizer) - 1
        extra = dict(alpha_type="vector", qk_layer_norms=True, cross_layer_interval=2,
                     freeze_text_module_exceptions=["Linear"], freeze_vision_module_exceptions=["LayerNorm"],
                     freeze_lm_head=True)
    else:
        vocab_size, additional = ((len(tokenizer) + 63) // 64) * 64, 0
        extra = dict(alpha_type="float", qk_layer_norms=False, cross_layer_interval=1, freeze_vision_layers=False)

    config = IdeficsConfig(
        vocab_size=vocab_size, additional_vocab_size=additional, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, max_position_embeddings=512,
        pad_token_id=ids[IDEFICS_UNK], bos_token_id=ids[IDEFICS_BOS], eos_token_id=ids[IDEFICS_EOS],
        use_resampler=use_resampler,
        vision_config=dict(embed_dim=vision_hidden_size, image_size=image_size, patch_size=patch_size,
                           num_hidden_layers=vision_num_layers, num_attention_heads=vision_num_heads,
                           intermediate_size=2 * vision_hidden_size, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=use_resampler, resampler_n_latents=4, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=16, qk_layer_norms_perceiver=use_resampler),
        **extra,
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    _randomize_(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=ids[IDEFICS_BOS], eos_token_id=ids[IDEFICS_EOS],
                                               pad_token_id=ids[IDEFICS_UNK])
    model.save_pretrained(out_dir)

    image_processor = IdeficsImageProcessorPil(image_size=image_size)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size)
    processor.chat_template = IDEFICS_CHAT_TEMPLATE
    processor.save_pretrained(out_dir)
    return out_dir
