"""What ``vlmkit.LLM``'s callers pass, as the request bodies the server's path reads: conversations (OpenAI
messages, vLLM's plain-string and ``image_pil`` parts, in-memory video frames) and raw prompts (texts, token ids,
vLLM's ``multi_modal_data``). In-memory images become PNG data URIs, frames lossless ``.npy`` ones, so every
input goes through the one checked path; a bad one is an ``InputError`` naming it, before any row runs."""

from __future__ import annotations

import base64
import io
import os

from ..errors import InputError, MediaError

_CHAT_TAKES = ("chat takes a conversation (a list of messages such as {'role': 'user', 'content': 'Hi'}) or a "
               "list of conversations")


def prompt_list(prompts) -> list:
    """One prompt (a text or a dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts)
    raise InputError(f"generate takes a prompt (a text, {{'prompt': text}} or {{'prompt_token_ids': ids}}) or a "
                     f"non-empty list of them, got {type(prompts).__name__} {prompts!r:.60}")


def completion_prompt(prompt, index: int) -> dict:
    """A prompt as ``/v1/completions`` takes it: ``prompt`` (a text or token ids), with a text's
    ``multi_modal_data`` as URLs."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}, key=str)
        if unknown or len(set(prompt) & {"prompt", "prompt_token_ids"}) != 1:
            raise InputError(f"prompt {index}: a prompt dict holds 'prompt' (a text) or 'prompt_token_ids' (token "
                             f"ids), one of them, and for a text its 'multi_modal_data'; got the keys "
                             f"{sorted(prompt, key=str)}")
        value = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if "multi_modal_data" in prompt and "prompt" not in prompt:
            raise InputError(f"prompt {index}: multi_modal_data goes with a text 'prompt', whose placeholders the "
                             f"processor expands into the images' tokens; token ids cannot place images")
        if "prompt" in prompt and isinstance(value, str):
            if "multi_modal_data" in prompt:
                return {"prompt": value,
                        "multi_modal_data": _multi_modal_data(prompt["multi_modal_data"], f"prompt {index}")}
            return {"prompt": value}
        ids = _token_ids(value) if "prompt_token_ids" in prompt else None
        if ids:
            return {"prompt": ids}
        raise InputError(f"prompt {index}: 'prompt' must be a text and 'prompt_token_ids' a non-empty list (or 1-D "
                         f"numpy array or tensor) of non-negative integer token ids, got {value!r:.60}")
    raise InputError(f"prompt {index} is a {type(prompt).__name__}; a prompt is a text, {{'prompt': text}} or "
                     f"{{'prompt_token_ids': ids}}")


def _token_ids(value) -> list[int] | None:
    """Token ids as plain ints, from a list or tuple (of ints, numpy or torch integer scalars), a 1-D numpy
    array or a 1-D tensor, as vLLM takes what a tokenizer returns with ``return_tensors``; None otherwise."""
    if hasattr(value, "tolist") and getattr(value, "ndim", None) == 1:  # numpy array, torch tensor
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    ids = []
    for token in value:
        if hasattr(token, "ndim") and token.ndim == 0 and hasattr(token, "item"):
            token = token.item()  # a numpy or torch scalar; a float one stays a float and is refused
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            return None
        ids.append(int(token))
    return ids


def _multi_modal_data(data, where: str) -> dict:
    """vLLM's ``multi_modal_data`` as the server's: each image a URL (in-memory images as PNG data URIs), each
    video a URL or local path (``{"url", "num_frames"}`` to choose the frames sampled), or its frames in memory
    (sent as a lossless .npy data URI: `_frames_data_uri`)."""
    if not isinstance(data, dict) or not data or set(data) - {"image", "video"}:
        got = sorted(data, key=str) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{where}: multi_modal_data must be a dict {{'image': image or list of images}} (and "
                         f"'video' for LLaVA-OneVision), got {got}")
    sent = {}
    for kind, items in data.items():
        if kind == "video" and _is_frame_list(items):
            items = [items]  # one video's frames, as transformers' make_batched_videos reads such a list
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        if not items:
            raise InputError(f"{where}: multi_modal_data[{kind!r}] is empty; give one, or leave it out")
        if kind == "image":
            sent[kind] = [os.fspath(image) if isinstance(image, (str, os.PathLike))  # a URL, or a path with media_root
                          else _png_data_uri(image, f"{where}, multi_modal_data['image'][{k}]", "multi_modal_data")
                          for k, image in enumerate(items)]
        else:
            sent[kind] = [_video_url(video, f"{where}, multi_modal_data['video'][{k}]") for k, video in enumerate(items)]
    return sent


def _is_frame_list(value) -> bool:
    """Whether a list is one video's frames (PIL images, or 3-D arrays or tensors) rather than a list of videos."""
    import numpy as np
    from PIL import Image

    from ..io.media import is_tensor

    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(item, Image.Image) or ((isinstance(item, np.ndarray) or is_tensor(item)) and item.ndim == 3)
        for item in value)


def _video_url(video, where: str):
    """A video as the server's ``video_url``: a URL or path as it is, frames in memory as a data: URI, and in
    ``{"url", "num_frames"}`` the same for its ``url``."""
    if isinstance(video, dict):
        return {**video, "url": _video_url(video["url"], where)} if "url" in video else video  # the server names it
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)  # a URL, or a path with media_root
    return _frames_data_uri(video, where)


def _frames_data_uri(frames, where: str) -> str:
    """Video frames held in memory (a uint8 array or tensor [frames, height, width, 3], or a list of frames) as a
    lossless ``data:application/x-npy`` URI, which the server reads back bit-exactly."""
    import numpy as np

    from ..io.media import is_tensor
    from ..io.video import frames_data_uri

    if not (isinstance(frames, (np.ndarray, list, tuple)) or is_tensor(frames)):
        raise InputError(f"{where}: a video is its URL or file path (make the LLM with media_root), or its frames: a "
                         f"uint8 numpy array or tensor [frames, height, width, 3] or a list of frames; got "
                         f"{type(frames).__name__}")
    try:
        return frames_data_uri(frames)
    except MediaError as err:
        raise InputError(f"{where}: {err}") from None


def conversations_of(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or many (a list of such lists), as a list of conversations."""
    if isinstance(messages, dict):
        raise InputError(f"{_CHAT_TAKES}, got one message (a dict); wrap it in a list: [message]")
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        hint = "; for one question, pass [{'role': 'user', 'content': text}]" if isinstance(messages, str) else ""
        raise InputError(f"{_CHAT_TAKES}, got {type(messages).__name__}{hint}")
    messages = list(messages)
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    for c, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)):
            hint = "; for questions, pass [{'role': 'user', 'content': text}] for each" \
                if isinstance(conversation, str) else ""
            raise InputError(f"{_CHAT_TAKES}: conversation {c} is of type {type(conversation).__name__}{hint}")
        for i, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise InputError(f"{_CHAT_TAKES}: conversation {c}, message {i} is of type {type(message).__name__}, "
                                 f"not a dict with 'role' and 'content'")
    return conversations


def openai_message(message: dict, where: str) -> dict:
    """A message with PIL images (vLLM's ``image_pil`` parts, or ``image`` parts holding a PIL image, array
    or tensor) turned into ``image_url`` parts with a PNG data URI, ``video`` parts holding frames (and an
    optional ``num_frames``) into ``video_url`` parts with a .npy data URI, and plain-string parts into text
    parts (as vLLM's chat parser reads them): the form the request path takes."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for k, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            raise InputError(f"{where}, content part {k} is of type {type(part).__name__}; give a dict such as "
                             f"{{'type': 'text', 'text': ...}} or a string")
        image = part.get("image_pil") if part.get("type") == "image_pil" else \
            part.get("image") if part.get("type") == "image" and not isinstance(part.get("image"), str) else None
        if part.get("type") == "image_pil" and image is None:
            raise InputError(f"{where}, content part {k}: an image_pil part needs its image under 'image_pil'")
        if part.get("type") == "video" and part.get("video") is not None and not isinstance(part["video"], str):
            asked = {"num_frames": part["num_frames"]} if "num_frames" in part else {}
            parts.append({"type": "video_url", "video_url": {
                "url": _frames_data_uri(part["video"], f"{where}, content part {k}"), **asked}})
            continue
        parts.append({"type": "image_url", "image_url": {"url": _png_data_uri(image, f"{where}, content part {k}")}}
                     if image is not None else part)
    return {**message, "content": parts}


def _png_data_uri(image, where: str, taker: str = "an image_pil part") -> str:
    """A PIL image, array or tensor as a PNG data URI; ``taker`` names what takes it in errors."""
    from PIL import Image

    from ..io.media import is_tensor, load_image

    if isinstance(image, (str, os.PathLike)):
        raise InputError(f"{where}: {taker} takes a PIL image (or a numpy array or tensor), not a path "
                         f"({str(image)!r:.80}); open it with PIL.Image.open, or send an image_url part with the "
                         f"path and make the LLM with media_root")
    if not isinstance(image, Image.Image):
        import numpy as np

        if not (isinstance(image, np.ndarray) or is_tensor(image)):
            raise InputError(f"{where}: {taker} takes a PIL image (or a numpy array or tensor), got "
                             f"{type(image).__name__}")
        try:
            image = load_image(image)  # HxW, HxWxC or CxHxW, as the processors take arrays
        except MediaError as err:
            raise InputError(f"{where}: {err}") from None
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")  # lossless: the model sees the same pixels
    except (OSError, ValueError, KeyError):  # a mode PNG cannot hold (CMYK, F): RGB as the processors convert it
        from ..io.media import to_rgb

        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
