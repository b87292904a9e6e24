"""Examples to tensors, exactly as inference will see them.

Understanding: the chat template renders the conversation; context is tokenised with the processor
(BOS, the image block) and every assistant answer (plus EOS) is a label, the rest -100.
Generation: the ``imagine`` prompt (template + ``<begin_of_image>``) followed by the image's VQ
tokens; caption dropout swaps the prompt for the unconditional one CFG uses at inference (every
token but BOS and ``<begin_of_image>`` replaced by pad). Rows are right-padded: causal attention
never lets a real token see the padding after it, so no attention mask is needed."""

from __future__ import annotations

import random

import torch

from ..errors import InputError
from ..models.janus.image_generation import unconditional_prompt
from .data import GenerationExample, UnderstandingExample, plain_message

IGNORE = -100


def _template_messages(messages: list[dict]) -> list[dict]:
    out = []
    for index, message in enumerate(messages):
        content = [{"type": "text", "text": message["content"]}]
        if index == 0:
            if message["role"] != "user":
                raise InputError("a training conversation must start with the user's turn")
            content.insert(0, {"type": "image"})
        out.append({"role": message["role"], "content": content})
    return out


def understanding_row(processor, example: UnderstandingExample) -> tuple[list[int], list[int], torch.Tensor]:
    """(input ids, labels, pixel values [1, 3, H, W]) of one conversation."""
    tokenizer = processor.tokenizer
    messages = _template_messages(example.messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError("a training conversation needs at least one assistant answer")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    pixel_values = None
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = processor.apply_chat_template(messages[:index], add_generation_prompt=True)
        if not context.startswith(rendered):
            raise InputError("the chat template does not render conversations incrementally; cannot mask answers")
        piece = context[len(rendered):]
        if pixel_values is None:
            features = processor(text=piece, images=[example.image])
            context_ids = features["input_ids"][0].tolist()
            pixel_values = features["pixel_values"]
        else:
            context_ids = tokenizer.encode(piece, add_special_tokens=False)
        answer = message["content"][0]["text"].strip()
        answer_ids = tokenizer.encode(" " + answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids += context_ids + answer_ids
        labels += [IGNORE] * len(context_ids) + answer_ids
        rendered = context + " " + answer + tokenizer.eos_token
    return ids, labels, pixel_values


class RowLengths:
    """Token counts of training rows without reading their images, to refuse rows longer than the
    model's context before training: ``understanding_row`` and ``generation_prompt_ids`` plus the image
    block, which ``tests/test_train_recipes.py`` keeps equal to the real rows' lengths."""

    def __init__(self, processor, num_image_tokens: int):
        from PIL import Image
        self.processor = processor
        self.num_image_tokens = num_image_tokens
        # the image block's tokens are special tokens (nothing merges across them), so a context piece's
        # length is its text's tokens plus a constant: BOS, any default system prompt, the block for the
        # placeholder
        placeholder = processor.image_token
        blank = Image.new("RGB", (8, 8))
        with_image = len(processor(text=placeholder, images=[blank])["input_ids"][0])
        self.first_piece_extra = with_image - len(processor.tokenizer.encode(placeholder, add_special_tokens=False))

    def understanding(self, messages: list[dict]) -> int:
        """``len(understanding_row(...)[0])`` for a conversation (``data.plain_message`` messages)."""
        tokenizer = self.processor.tokenizer
        messages = _template_messages(messages)
        length, rendered = 0, ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            context = self.processor.apply_chat_template(messages[:index], add_generation_prompt=True)
            length += len(tokenizer.encode(context[len(rendered):], add_special_tokens=False))
            answer = message["content"][0]["text"].strip()
            length += len(tokenizer.encode(" " + answer, add_special_tokens=False)) + 1  # + EOS
            rendered = context + " " + answer + tokenizer.eos_token
        return length + self.first_piece_extra

    def generation(self, caption: str) -> int:
        """The length of a generation row: the ``imagine`` prompt and the image's tokens."""
        return len(generation_prompt_ids(self.processor, caption)) + self.num_image_tokens


def check_row_lengths(processor, source, num_image_tokens: int, context: int) -> None:
    """Refuse the first JSONL line whose training row is longer than the model's ``context``: the model
    would learn positions inference never reaches, and a long enough row only shows as an out-of-memory
    at the step that draws it."""
    lengths = RowLengths(processor, num_image_tokens)
    rows = [(r, lengths.understanding, [plain_message(m) for m in r["conversation"]]) for r in source.understanding_records]
    rows += [(r, lengths.generation, r["caption"]) for r in source.generation_records]
    for record, length_of, content in rows:
        length = length_of(content)
        if length > context:
            raise InputError(f"{record['where']}: its training row is {length} tokens long, longer than the model's "
                             f"context of {context} tokens (max_position_embeddings); shorten or split the line, or "
                             f"remove it")


def understanding_batch(processor, examples: list[UnderstandingExample]) -> dict:
    """``input_ids``, ``labels`` and ``pixel_values`` for ``model(**batch)``."""
    rows = [understanding_row(processor, e) for e in examples]
    length = max(len(ids) for ids, _, _ in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat([p for _, _, p in rows])}


def generation_prompt_ids(processor, caption: str) -> list[int]:
    """The token ids ``vlmkit imagine`` feeds for this caption (ending in ``<begin_of_image>``)."""
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": caption}]}],
                                           add_generation_prompt=True)
    return processor(text=prompt, generation_mode="image")["input_ids"][0].tolist()


def generation_batch(processor, examples: list[GenerationExample], rng: random.Random,
                     caption_dropout: float) -> dict:
    """``prompts`` (list of id tensors), ``caption_ids`` (each caption's own token ids as they read
    mid-sentence; empty where the caption was dropped), ``pixel_values`` [B, 3, H, W]; the caller
    adds VQ tokens."""
    tokenizer = processor.tokenizer
    begin_image = tokenizer.token_id(processor.image_start_token)
    prompts, caption_ids = [], []
    for example in examples:
        ids = torch.tensor(generation_prompt_ids(processor, example.caption))
        words = tokenizer.encode(" " + example.caption.strip(), add_special_tokens=False)
        if rng.random() < caption_dropout:
            ids = unconditional_prompt(ids, tokenizer.bos_token_id, begin_image, tokenizer.pad_token_id)
            words = []
        prompts.append(ids)
        caption_ids.append(words)
    pixel_values = processor.image_processor([e.image for e in examples])["pixel_values"]
    return {"prompts": prompts, "caption_ids": caption_ids, "pixel_values": pixel_values}


def generation_inputs(model, prompts: list[torch.Tensor], image_tokens: torch.Tensor) -> dict:
    """``inputs_embeds`` and ``labels`` for ``model(..., generation_mode="image")``: each row is its
    prompt's text embeddings then the image tokens' embeddings; labels are the image tokens."""
    num_tokens = image_tokens.shape[1]
    length = max(len(p) for p in prompts) + num_tokens
    text_embeds = model.text_model.embed_tokens
    image_embeds = model.image_token_embeddings(image_tokens)
    rows, labels = [], []
    for prompt, embeds, tokens in zip(prompts, image_embeds, image_tokens):
        row = torch.cat([text_embeds(prompt), embeds])
        fill = length - row.shape[0]
        rows.append(torch.cat([row, row.new_zeros(fill, row.shape[1])]))
        labels.append(torch.cat([tokens.new_full((len(prompt),), IGNORE), tokens, tokens.new_full((fill,), IGNORE)]))
    return {"inputs_embeds": torch.stack(rows), "labels": torch.stack(labels)}
