"""The tokenizer and processor files of a trained checkpoint: a byte-level BPE trained with
``tokenizers`` on the domain's text plus the Janus special tokens, its ``tokenizer_config.json``,
the Janus-Pro chat template and ``processor_config.json`` (transformers' layout throughout)."""

from __future__ import annotations

import json
from pathlib import Path

from ..models.janus.chat_template import JANUS_PRO_CHAT_TEMPLATE

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
PAD = "<\uff5c\u2581pad\u2581\uff5c>"
IMAGE = "<image_placeholder>"
BEGIN_IMAGE = "<begin_of_image>"
END_IMAGE = "<end_of_image>"
# the real checkpoints' added tokens, in their relative order
SPECIAL_TOKENS = [BOS, EOS, PAD, BEGIN_IMAGE, END_IMAGE, IMAGE, "<patch_placeholder>", "<|ref|>", "<|/ref|>",
                  "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]



def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE (any text encodes; decode inverts encode) with the special tokens after the
    learned vocabulary and a post-processor that prepends BOS, as DeepSeek's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """The ids the model config and generation config need."""
    return {"bos": tokenizer.token_to_id(BOS), "eos": tokenizer.token_to_id(EOS), "pad": tokenizer.token_to_id(PAD),
            "image": tokenizer.token_to_id(IMAGE), "boi": tokenizer.token_to_id(BEGIN_IMAGE)}


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processor_files(folder: Path, tokenizer, image_size: int, num_image_tokens: int) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja, processor_config.json and
    generation_config.json, as transformers' ``save_pretrained`` writes them for Janus-Pro."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "processor_class": "JanusProcessor",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "image_token": IMAGE, "boi_token": BEGIN_IMAGE, "eoi_token": END_IMAGE, "extra_special_tokens": [],
        "clean_up_tokenization_spaces": False, "model_max_length": 16384, "padding_side": "left",
    })
    (folder / "chat_template.jinja").write_text(JANUS_PRO_CHAT_TEMPLATE, encoding="utf-8")
    _write_json(folder / "processor_config.json", {
        "image_processor": {
            "image_processor_type": "JanusImageProcessor", "background_color": [127, 127, 127],
            "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "min_size": 14, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
        },
        "num_image_tokens": num_image_tokens, "processor_class": "JanusProcessor",
        # the built-in domain never saw DeepSeek's system prompt; short prompts train faster
        "use_default_system_prompt": False,
    })
    ids = token_ids(tokenizer)
    _write_json(folder / "generation_config.json", {
        "_from_model_config": False, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"], "generation_kwargs": {"boi_token_id": ids["boi"]},
        "guidance_scale": 5, "temperature": 1,
    })
