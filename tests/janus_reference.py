"""Loading the transformers reference for Janus tests (test-only dependency)."""

import functools

import torch


@functools.lru_cache(maxsize=4)
def reference(path: str):
    """(transformers processor with the PIL backend, transformers model in fp32) for a checkpoint."""
    import transformers

    processor = transformers.JanusProcessor.from_pretrained(path, backend="pil")
    model = transformers.JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return processor, model


@functools.lru_cache(maxsize=4)
def ours(path: str):
    """(vlmkit processor, vlmkit model in fp32)."""
    from vlmkit import JanusForConditionalGeneration, JanusProcessor

    return JanusProcessor.from_pretrained(path), JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def chat_inputs(processor, messages, **options):
    return processor.apply_chat_template(messages, add_generation_prompt=True, generation_mode="text", tokenize=True,
                                         return_dict=True, return_tensors="pt", **options)
