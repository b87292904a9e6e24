"""``return_assistant_tokens_mask``: which tokens of a chat prompt the assistant wrote, from the characters
the template's ``{% generation %}`` blocks cover (``chat_template.render_chat_template`` notes them). The
tokenizer's rule and the processor's are transformers' own, which differ a little: the tokenizer marks the
tokens from the one holding a block's first character to the one holding its last; the processor marks
every token overlapping a block, the image tokens its prompts were expanded with left out."""

from __future__ import annotations

import torch


def tokenizer_masks(backend, texts: list[str], spans: list[list[tuple[int, int]]], rows: list[list[int]],
                    padding_side: str) -> list[list[int]]:
    """Masks for ``rows`` (the tokenizer's rows of ``texts``, unspecial, maybe padded on ``padding_side``), as
    transformers' tokenizer makes them with ``char_to_token``."""
    masks = []
    for encoding, text_spans, row in zip(backend.encode_batch(texts, add_special_tokens=False), spans, rows):
        pad = max(len(row) - len(encoding.ids), 0) if padding_side == "left" else 0  # (a cut row has none)
        mask = [0] * len(row)
        for start, end in text_spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None or first + pad >= len(row):  # (cut off: transformers stops at the first such block)
                break
            last = None if last is None or last + pad >= len(row) else last + pad
            for index in range(first + pad, last + 1 if last else len(row)):
                mask[index] = 1
        masks.append(mask)
    return masks


def processor_masks(backend, texts: list[str], spans: list[list[tuple[int, int]]], rows: list[list[int]],
                    attention_mask, media_ids: set[int], add_special_tokens: bool) -> list[list[int]]:
    """Masks for a processor's ``rows``, made from ``texts`` (the rendered prompts) by expanding each image
    placeholder into ``media_ids`` tokens: a token is marked when its characters overlap a block. The text's
    own tokens are the same, in the same order, in ``texts`` and in the rows (the expansion only inserts
    special tokens), so each is marked by its twin in ``texts``; padding and media tokens stay 0."""
    masks = []
    padding = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
    for row_index, (encoding, text_spans, row) in enumerate(
            zip(backend.encode_batch(texts, add_special_tokens=add_special_tokens), spans, rows)):
        marks = [int(any(token_start < end and token_end > start for start, end in text_spans))
                 for token, (token_start, token_end) in zip(encoding.ids, encoding.offsets) if token not in media_ids]
        real = padding[row_index] if padding is not None else [1] * len(row)
        text_positions = [i for i, (token, keep) in enumerate(zip(row, real)) if keep and token not in media_ids]
        # a row holds more text when the processor put some before the prompt (Janus' default system prompt),
        # less when truncation cut its end
        extra = len(text_positions) - len(marks)
        mask = [0] * len(row)
        for position, mark in zip(text_positions[max(extra, 0):], marks):
            mask[position] = mark
        masks.append(mask)
    return masks
