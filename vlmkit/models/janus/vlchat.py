"""DeepSeek's ``VLChatProcessor`` call style on top of ``JanusProcessor``:
``processor(conversations=[{"role": "<|User|>", "content": "<image_placeholder>\\n...", "images": [...]},
{"role": "<|Assistant|>", "content": ""}], images=pil_images)`` -> input ids, masks, per-sample image
tensors and the formatted prompts, with left padding, as the original repository returns them."""

import torch

from ...errors import InputError
from ...processing import BatchFeature
from .original_layout import SEPARATORS


def format_conversation(messages: list[dict], system_prompt: str) -> str:
    """The original "deepseek" SFT format: system, then ``role: content`` turns with alternating
    separators; an empty turn (the assistant's) ends the prompt as ``role:``."""
    parts = [system_prompt + SEPARATORS[0]] if system_prompt else []
    for index, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise InputError("each conversation message needs 'role' and 'content'")
        if not isinstance(message["content"], str):  # DeepSeek's code fails on .strip(); say what to do instead
            raise InputError(
                f"conversations= takes DeepSeek's format, where a message's content is a string with "
                f"<image_placeholder> for each image and images= gives the images; got content of type "
                f"{type(message['content']).__name__}. For transformers-style content blocks "
                f"([{{'type': 'text', ...}}, {{'type': 'image', ...}}]) use processor.apply_chat_template(messages)")
        content = message["content"].strip()
        if content:
            parts.append(f"{message['role']}: {content}{SEPARATORS[index % 2]}")
        else:
            parts.append(f"{message['role']}:")
    return "".join(parts).strip()


def vlchat_call(processor, *, system_prompt: str, prompt=None, conversations=None, images=None,
                force_batchify: bool = True):
    """One sample (or a batch: a list of conversations) in the original processor's output layout;
    ``system_prompt`` opens each formatted conversation."""
    if (prompt is None) == (conversations is None):
        raise InputError("pass exactly one of prompt= or conversations=")
    batched = conversations is not None and conversations and isinstance(conversations[0], (list, tuple))
    samples = conversations if batched else [conversations if conversations is not None else None]
    image_groups = images if batched else [images or []]
    if len(image_groups) != len(samples):
        raise InputError(f"{len(samples)} conversations but {len(image_groups)} image lists")
    system = system_prompt.rstrip("\n")
    texts = [prompt if sample is None else format_conversation(sample, system) for sample in samples]
    pad_id = processor.tokenizer.pad_token_id
    rows, sample_pixels = [], []
    for text, group in zip(texts, image_groups):
        one = processor(text, images=list(group) or None, generation_mode="plain")
        rows.append(one["input_ids"][0])
        sample_pixels.append(one.get("pixel_values"))
    if not force_batchify and not batched:
        return _prepared_sample(processor, texts[0], rows[0], sample_pixels[0])
    length = max(len(r) for r in rows)
    # DeepSeek's batchify keeps at least one image slot (zeros, masked off by images_emb_mask), so a batch
    # without images still has pixel_values [B, 1, 3, S, S]; the model skips the masked-off slots.
    most_images = max(1, max((p.shape[0] for p in sample_pixels if p is not None), default=0))
    size = processor.image_processor.size
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    pixel_values = torch.zeros((len(rows), most_images, 3, size, size))
    images_emb_mask = torch.zeros((len(rows), most_images, processor.num_image_tokens), dtype=torch.bool)
    for index, (row, pixels) in enumerate(zip(rows, sample_pixels)):
        input_ids[index, length - len(row):] = row
        attention_mask[index, length - len(row):] = 1
        if pixels is not None:
            pixel_values[index, :pixels.shape[0]] = pixels
            images_emb_mask[index, :pixels.shape[0]] = True
    return BatchFeature(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        images_seq_mask=input_ids == processor.image_token_id, images_emb_mask=images_emb_mask,
                        sft_format=texts)


def _prepared_sample(processor, text: str, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> BatchFeature:
    """What the original ``process_one`` returns (``force_batchify=False``): one sample, no batch dimension,
    no masks, and the image-token count of each image."""
    count = 0 if pixels is None else pixels.shape[0]
    return BatchFeature(sft_format=text, input_ids=input_ids,
                        # the original's image processor turns an empty image list into a 1-D empty tensor
                        pixel_values=torch.zeros(0) if pixels is None else pixels,
                        num_image_tokens=torch.full((count,), processor.num_image_tokens, dtype=torch.int32))
