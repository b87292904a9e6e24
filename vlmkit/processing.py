"""What every family's processor shares: the output container (``BatchFeature``), chat-template
rendering of conversations with image/video content blocks, and expanding image placeholders."""

from collections.abc import Callable

import torch

from .errors import InputError


class BatchFeature(dict):
    """A dict of model inputs with attribute access and a ``.to`` that casts floating tensors only."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BatchFeature":
        """Move tensors to ``device``; cast only floating tensors (pixels) to ``dtype``, never token ids."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        moved = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            moved[key] = value
        return moved


def normalize_conversations(conversation) -> tuple[list[list[dict]], bool]:
    """(list of conversations, whether the input was a batch) for one conversation or a batch of them."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError("a conversation must be a non-empty list of messages (or a list of such lists)")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = [list(c) for c in conversation] if batched else [list(conversation)]
    for messages in conversations:
        if not messages or any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise InputError("every message must be a dict with a 'role' and 'content'")
    return conversations, batched


def content_as_blocks(message: dict) -> dict:
    """The message with a plain-string content turned into one text block, the shape that templates
    iterating over content blocks expect."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": [{"type": "text", "text": content}]}
    return message


def media_from_messages(messages: list[dict], kind: str) -> list:
    """The image (or video) sources of one conversation's content blocks, in order."""
    keys = ("image", "url", "path", "base64") if kind == "image" else ("video", "url", "path")
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for block in content:
            if isinstance(block, dict) and block.get("type") == kind:
                sources = [block[k] for k in keys if k in block]
                if not sources:
                    raise InputError(f"a {kind} content block needs one of the keys {', '.join(keys)}")
                found.extend(sources)
    return found


def expand_placeholders(texts: list[str], placeholder: str, image_counts: list[int] | None,
                        expansion: Callable[[int], str], total_images: int, kind: str = "image") -> list[str]:
    """Replace each ``placeholder`` in ``texts`` by ``expansion(image_index)``; the number of
    placeholders must equal the number of images (per text when ``image_counts`` is given).
    ``kind`` names the media in error messages ("image", "video")."""
    counts = [t.count(placeholder) for t in texts]
    if image_counts is not None:
        for row, (have, want) in enumerate(zip(counts, image_counts)):
            if have != want:
                raise InputError(f"prompt {row} has {have} {kind} placeholder(s) ({placeholder}) but {want} "
                                 f"{kind}(s) were given for it; they must match")
    if sum(counts) != total_images:
        raise InputError(f"the prompt(s) hold {sum(counts)} {kind} placeholder(s) ({placeholder}) but "
                         f"{total_images} {kind}(s) were given; they must match")
    expanded, index = [], 0
    for text in texts:
        pieces = text.split(placeholder)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out.append(expansion(index))
            out.append(piece)
            index += 1
        expanded.append("".join(out))
    return expanded


def flatten_images(images) -> tuple[list, list[int] | None]:
    """(flat list of images, per-prompt counts or None) for one image, a list, or a list of lists."""
    if images is None:
        return [], None
    if not isinstance(images, (list, tuple)):
        return [images], None
    if images and all(isinstance(i, (list, tuple)) for i in images):
        return [img for group in images for img in group], [len(group) for group in images]
    return list(images), None
