"""What every family's processor shares: the output container (``BatchFeature``), the base class with
chat-template rendering and decoding (``ProcessorBase``), conversations with image/video content
blocks, and expanding image placeholders."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .io.assistant_masks import processor_masks
from .io.chat_template import template_variables
from .io.checkpoint import read_json
from .io.features import BatchFeature, as_return_type
from .io.media import flat_image_list
from .io.pixels import IMAGE_SETTINGS
from .io.tokenizer import tokenizer_settings

# from_pretrained keywords that pick transformers' backend, class or device, and change nothing in vlmkit's
# processors (which run on the CPU, with the fast tokenizer)
NEUTRAL_LOAD_OPTIONS = frozenset({"backend", "use_fast", "_from_pipeline", "device", "dtype", "torch_dtype",
                                  "device_map", "attn_implementation", "low_cpu_mem_usage"})


@dataclass
class LoadOptions:
    """A processor's from_pretrained keywords by where transformers hands them: ``image`` to the image (and
    video) processor's config, ``processor`` to the processor's own settings, ``tokenizer`` to the tokenizer."""

    image: dict
    processor: dict
    tokenizer: dict


def sort_load_options(options: dict, image_keys=(), processor_keys=()) -> LoadOptions:
    """Sort what is left of a processor's from_pretrained ``options`` once the checkpoint is located.

    transformers gives every keyword to the tokenizer, the image processor and the processor alike, each
    taking the ones it knows: the image settings (``image_mean``, ``size``... and the family's
    ``image_keys``), the processor's own (``processor_keys``: ``num_image_tokens``...), the tokenizer's
    (``pad_token``, ``padding_side``, ``chat_template``...). One none of them reads is kept in the
    tokenizer's config, as transformers keeps it in the tokenizer's init_kwargs, with a warning that it
    changes nothing."""
    options = {k: v for k, v in options.items() if k not in NEUTRAL_LOAD_OPTIONS}
    image = {k: options.pop(k) for k in list(options) if k in IMAGE_SETTINGS or k in image_keys}
    processor = {k: options[k] for k in options if k in processor_keys}
    tokenizer = tokenizer_settings(options)
    unknown = sorted(k for k in options if k not in processor)
    if unknown:
        warnings.warn(f"from_pretrained got {', '.join(unknown)}, which no part of this processor reads; ignored",
                      stacklevel=3)
    tokenizer.update({k: options[k] for k in unknown})
    return LoadOptions(image=image, processor=processor, tokenizer=tokenizer)


def config_file(folder: Path, name: str) -> dict:
    """A checkpoint's JSON file as a dict, or ``{}`` when the folder has no such file."""
    return read_json(folder / name) if (folder / name).is_file() else {}


class ProcessorBase:
    """``apply_chat_template``, ``decode`` and ``batch_decode`` as transformers' processors have them,
    over a family's ``tokenizer``, ``chat_template`` and ``__call__``. A family sets which keyword
    arguments of ``apply_chat_template`` are for its ``__call__`` and says how rendered prompts become
    model inputs (``encode_chat``)."""

    tokenizer = None
    chat_template: str | None = None
    # turn plain-string message contents into one text block (templates that iterate content blocks
    # render a plain string as nothing)
    chat_content_as_blocks: bool = True
    # the tokens a family expands its image placeholders into (for assistant masks); None: masks not given
    media_tokens: tuple[str, ...] | None = None
    # the processor's own settings processor_config.json holds (transformers' processor arguments)
    own_settings: tuple[str, ...] = ()

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, chat_template: str | None = None,
                            continue_final_message: bool = False, processor_kwargs: dict | None = None,
                            return_assistant_tokens_mask: bool = False, **kwargs):
        """Render conversation(s) with the checkpoint's chat template (or ``chat_template``); with
        ``tokenize=True`` return model inputs, the media named in the messages' content blocks loaded.

        As in transformers, keyword arguments the template reads are template variables; the others,
        and ``processor_kwargs``, are options of the processor call (``padding``, ``num_frames``...).
        ``return_assistant_tokens_mask`` (with ``return_dict``) adds ``assistant_masks``: 1 on the tokens
        the template's ``{% generation %}`` blocks hold."""
        template = chat_template or self.chat_template
        if template is None:
            raise InputError("this checkpoint has no chat template")
        if return_assistant_tokens_mask and self.media_tokens is None:
            raise InputError(f"{type(self).__name__} does not give return_assistant_tokens_mask; build the mask from "
                             f"the tokenizer's apply_chat_template(..., return_assistant_tokens_mask=True)")
        conversations, batched = normalize_conversations(conversation)
        if self.chat_content_as_blocks:
            conversations = [[content_as_blocks(m) for m in messages] for messages in conversations]
        variables = template_variables(template)
        call_options = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in variables}}
        template_options = {k: v for k, v in kwargs.items() if k in variables}
        spans = [[] for _ in conversations] if return_assistant_tokens_mask else None
        prompts = self.tokenizer.render_chats(conversations, template, add_generation_prompt, continue_final_message,
                                              spans, **template_options)
        if not tokenize:
            return prompts if batched else prompts[0]
        if "do_sample_frames" not in call_options and (call_options.get("num_frames") is not None
                                                       or call_options.get("fps") is not None):
            call_options["do_sample_frames"] = True  # asking for frames in a chat means sampling them
        if self.prompts_start_with_bos(prompts):
            call_options["add_special_tokens"] = False  # the template wrote BOS already
        features = self.encode_chat(prompts, conversations, call_options)
        if return_dict and return_assistant_tokens_mask:
            features["assistant_masks"] = self._assistant_masks(prompts, spans, features, call_options)
        return features if return_dict else features["input_ids"]

    def _assistant_masks(self, prompts: list[str], spans: list, features: dict, call_options: dict):
        """``assistant_masks`` for the rows ``encode_chat`` made of ``prompts``, in their type."""
        ids = features["input_ids"]
        rows = ids.tolist() if hasattr(ids, "tolist") else [ids] if ids and isinstance(ids[0], int) else ids
        media_ids = {self.tokenizer.token_id(token) for token in self.media_tokens} - {None}
        masks = processor_masks(self.tokenizer.backend, prompts, spans, rows, features.get("attention_mask"),
                                media_ids, call_options.get("add_special_tokens", True))
        return_tensors = "pt" if isinstance(ids, torch.Tensor) else "np" if isinstance(ids, np.ndarray) else None
        return as_return_type(BatchFeature(assistant_masks=masks), return_tensors)["assistant_masks"]

    def encode_chat(self, prompts: list[str], conversations: list[list[dict]], call_options: dict) -> BatchFeature:
        """Model inputs for rendered ``prompts`` of ``conversations`` (the family's own)."""
        raise NotImplementedError

    def prompts_start_with_bos(self, prompts: list[str]) -> bool:
        """Whether the template already wrote BOS (then tokenising must not add another)."""
        return self.tokenizer.bos_token is not None and prompts[0].startswith(self.tokenizer.bos_token)

    def save_pretrained(self, save_directory, **options):
        """Write the processor's files (tokenizer, chat template, image/video processor configs) into
        ``save_directory``, as transformers' ``save_pretrained`` does; ``from_pretrained`` loads them back."""
        from .io.saving import save_processor_files
        return save_processor_files(self, save_directory, **options)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Token ids back to text (the tokenizer's ``decode``)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """The texts of ``generate``'s output (one text for one row), as transformers 5's processors give them."""
        return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Rows of token ids back to texts (the tokenizer's ``batch_decode``)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


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


def check_media_tokens_kept(texts: list[str], rows: list[list[int]], tokens: dict[str, int | None]) -> None:
    """Refuse token rows that lost media tokens to truncation (the model could not place the features
    of a cut image); ``tokens`` maps each media token's text to its id."""
    for text, row in zip(texts, rows):
        for token, token_id in tokens.items():
            if token_id is not None and row.count(token_id) != text.count(token):
                raise InputError(f"truncation cut {token} tokens out of the prompt ({row.count(token_id)} of "
                                 f"{text.count(token)} left), so the model could not place the image features: "
                                 f"turn truncation off or raise max_length")


def prompt_texts(text) -> list[str]:
    """A call's ``text`` as a list of prompts: one string, or a list or tuple of them; anything else is an
    error naming what was given (an image passed first, positionally, is the usual mistake)."""
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        got = type(text).__name__ if texts is None else \
            f"a list holding {type(next(t for t in texts if not isinstance(t, str))).__name__}"
        raise InputError(f"text must be a string or a list of strings, got {got} (pass images as images=..., "
                         f"e.g. processor(text=prompt, images=image))")
    return texts


def flatten_images(images) -> tuple[list, list[int] | None]:
    """(flat list of images, per-prompt counts or None) for one image, a list, or a list of lists."""
    if images is None:
        return [], None
    nested = isinstance(images, (list, tuple)) and images and all(isinstance(i, (list, tuple)) for i in images)
    return flat_image_list(images), [len(flat_image_list(group)) for group in images] if nested else None
