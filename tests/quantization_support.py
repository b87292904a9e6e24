"""Shared by the quantization tests: each family's tiny checkpoint, an image prompt for it on both
engines, and round-to-nearest weights (the error baseline vlmkit's int8/int4 are held to)."""

from __future__ import annotations

import functools

import torch

FAMILIES = ("janus", "llava_onevision", "idefics")
FIXTURES = {"janus": "janus_dir", "llava_onevision": "llava_onevision_dir", "idefics": "idefics_resampler_dir"}


def vlmkit_class(family: str):
    import vlmkit
    return {"janus": vlmkit.JanusForConditionalGeneration,
            "llava_onevision": vlmkit.LlavaOnevisionForConditionalGeneration,
            "idefics": vlmkit.IdeficsForVisionText2Text}[family]


def transformers_class(family: str):
    import transformers
    return {"janus": transformers.JanusForConditionalGeneration,
            "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
            "idefics": transformers.IdeficsForVisionText2Text}[family]


@functools.lru_cache(maxsize=8)
def image_prompt(family: str, folder: str) -> dict:
    """vlmkit processor outputs for one image and a question (the engines agree on them: see the
    family tests), as fp32 tensors."""
    import numpy as np
    from PIL import Image

    import vlmkit
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB")
    processor = vlmkit.AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    options = {"generation_mode": "text"} if family == "janus" else {}
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", **options)
    return {k: v for k, v in dict(inputs).items() if v is not None}


def forward_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def greedy_tokens(model, inputs: dict, family: str, new_tokens: int = 8) -> list[int]:
    options = {"generation_mode": "text"} if family == "janus" else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **options)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def relative_rms(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())


def rtn_int8(weight: torch.Tensor) -> torch.Tensor:
    """Plain round-to-nearest, symmetric, one scale per output channel (dequantized)."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def rtn_int4(weight: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Plain round-to-nearest, asymmetric, in groups of ``group_size`` inputs (the layer's width if smaller)."""
    out_features, in_features = weight.shape
    group_size = min(group_size, in_features)
    groups = weight.reshape(out_features, -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).reshape(out_features, in_features)


def with_rtn_weights(model, rtn) -> None:
    """Replace the weight of every linear layer of ``model`` (in place) by its round-to-nearest version."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(rtn(module.weight.float()).to(module.weight.dtype))
