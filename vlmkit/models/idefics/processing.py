"""IdeficsProcessor: interleaved prompts (lists mixing text, images and image URLs) to token ids, pixel
values padded to the batch's largest image count, and the ``image_attention_mask`` that tells the gated
cross-attention which image each token may see. Mirrors transformers' IdeficsProcessor; unlike it, keeps
the checkpoint's chat template and places a conversation's images where the user put them."""

from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ...io.chat_template import processor_chat_template
from ...io.checkpoint import checkpoint_location
from ...io.pixels import stack_same_shapes
from ...io.features import as_return_type
from ...io.tokenizer import Tokenizer
from ...processing import BatchFeature, ProcessorBase, config_file, media_from_messages, sort_load_options
from ...processor_options import sort_call_options
from .image_processing import IdeficsImageProcessor

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
_IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor)
# For checkpoints that save no chat template (the idefics-9b(-instruct) repositories predate them): the
# prompt format of the idefics-9b-instruct model card, "User: <text><image><end_of_utterance>\nAssistant:".
# A text block right after the role gets one space; image blocks become the image token where they are.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image>"
    "{% elif block['type'] == 'text' %}{% if loop.first %} {% endif %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)
_TEXT_OPTIONS = ("add_end_of_utterance_token", "add_eos_token")  # IDEFICS' own, beside the tokenizer's
_IMAGE_OPTIONS = ("transform", "image_size", "image_num_channels")
# from_pretrained keywords for the image processor beside every family's; the processor's own is its chat
# template, which transformers' IdeficsProcessor gives the tokenizer only (vlmkit's processor renders it too)
_IMAGE_KEYS, _PROCESSOR_KEYS = ("image_size", "image_num_channels"), ("chat_template",)


def is_url(text: str) -> bool:
    """The reference's test: a string without spaces that parses with a scheme and a host."""
    if " " in text:
        return False
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)


class IdeficsProcessor(ProcessorBase):
    """Tokenizer + image processor + the IDEFICS prompt conventions."""

    def __init__(self, image_processor: IdeficsImageProcessor, tokenizer: Tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.image_token_id = tokenizer.token_id(tokenizer.special_tokens.get("image_token", IMAGE_TOKEN))
        # add_end_of_utterance_token=None is documented as "on when the tokenizer has the token", but the
        # reference (transformers 5.23) looks where v5 tokenizers no longer list it, so it is always off
        # there. Prompts must tokenise exactly as the reference does, so None means off here too.
        self.tokenizer_was_trained_with_end_of_utterance_token = False

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str = "main", **options) -> "IdeficsProcessor":
        """Load from a checkpoint folder or the local HF cache (``backend=`` and such are accepted and ignored).
        Other keywords override the checkpoint's settings, as in transformers: the image processor's
        (``image_size``, ``image_mean``...), the tokenizer's (``pad_token``...) and the chat template."""
        folder = checkpoint_location(name_or_path, options, revision)
        loading = sort_load_options(options, _IMAGE_KEYS, _PROCESSOR_KEYS)
        processor_config = config_file(folder, "processor_config.json")
        image_config = processor_config.get("image_processor") or config_file(folder, "preprocessor_config.json")
        tokenizer = Tokenizer.from_pretrained(folder, **loading.tokenizer)
        template = loading.processor.get("chat_template") or processor_chat_template(folder, processor_config,
                                                                                     tokenizer.config)
        image_settings = {**image_config, **loading.image}
        if "size" in loading.image:  # it wins over image_size in transformers: its processor calls take it
            image_settings.pop("image_size", None)
        return cls(IdeficsImageProcessor.from_config(image_settings), tokenizer, chat_template=template)

    # --- prompts -------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Model inputs for one prompt or a batch.

        A prompt is a list whose items are text, images (PIL, numpy, torch) or image URLs; a batch is a
        list of prompts. It can be passed as ``text=``, or positionally (``processor(prompts)``, the
        model card's form). With both ``images`` and ``text``, prompt i is ``text[i]`` with ``images[i]``
        (a list: text first, then those images; a single image: the image first), as the reference.
        Options: ``add_end_of_utterance_token`` (None: on when the tokenizer has the token),
        ``add_eos_token``, ``transform`` (a callable replacing the image preprocessing), and
        transformers' tokenizer and image options (``padding``, default "longest"; ``truncation``,
        ``max_length``, ``size``, ``do_rescale``..., flat or as ``text_kwargs``/``images_kwargs``).
        Returns ``input_ids``, ``attention_mask``, ``pixel_values`` [batch, max images, 3, H, W] and
        ``image_attention_mask``, as torch tensors unless ``return_tensors`` asks for "np" or None (lists)."""
        options = sort_call_options(kwargs, family_text=_TEXT_OPTIONS, family_images=_IMAGE_OPTIONS)
        prompts = _prompts_from_arguments(images, text)
        samples = [[_classify(item, row, col) for col, item in enumerate(prompt)] for row, prompt in enumerate(prompts)]
        return as_return_type(self._encode(samples, options.text, options.images), options.return_tensors)

    def _prompt_text(self, items: list[tuple[str, object]], add_end_of_utterance_token: bool,
                     add_eos_token: bool) -> str:
        """The prompt string: BOS, texts verbatim, each image (run) wrapped in fake tokens."""
        text = self.tokenizer.bos_token or ""
        last_was_image = False
        for index, (kind, value) in enumerate(items):
            last_was_text = index > 0 and not last_was_image
            if kind == "image":
                # consecutive images share the fake token between them
                text += IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN
                last_was_image = True
            else:
                if add_end_of_utterance_token and last_was_text:  # between consecutive texts only
                    text += END_OF_UTTERANCE_TOKEN
                text += value
                last_was_image = False
        if add_eos_token:
            text += self.tokenizer.eos_token
        return text

    def _encode(self, samples: list[list[tuple[str, object]]], text_options: dict, image_options: dict) -> BatchFeature:
        text_options = {"padding": "longest", "add_special_tokens": False, **text_options}
        add_end_of_utterance_token = text_options.pop("add_end_of_utterance_token", None)
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.tokenizer_was_trained_with_end_of_utterance_token
        add_eos_token = text_options.pop("add_eos_token", False)
        transform = image_options.pop("transform", None)
        image_processor = self.image_processor.with_options(image_options)
        texts = [self._prompt_text(items, add_end_of_utterance_token, add_eos_token) for items in samples]
        sample_images = [[value for kind, value in items if kind == "image"] for items in samples]
        pixels = [image_processor(images, transform=transform, return_tensors="pt") if images else None
                  for images in sample_images]
        encoded = self.tokenizer(texts, **text_options)
        rows, masks = encoded["input_ids"], encoded.get("attention_mask")  # None: return_attention_mask=False
        if len({len(r) for r in rows}) > 1:
            raise InputError("the prompts have different lengths: pass padding='longest' (the default) or "
                             "padding='max_length' with a max_length at least as long as the longest prompt (or "
                             "truncation=True)")
        max_images = max(1, *(len(images) for images in sample_images))
        padded = []
        for row, row_pixels in zip(rows, pixels):
            # images beyond the row's image tokens (cut by truncation) are dropped, as the reference does
            keep = min(row.count(self.image_token_id), max_images)
            dims = row_pixels.shape[1:] if row_pixels is not None and keep else image_processor.image_dims
            tensor = torch.zeros(max_images, *dims)
            if keep:
                tensor[:keep] = row_pixels[:keep]
            padded.append(tensor)
        input_ids = torch.tensor(rows, dtype=torch.long)
        if any(sample_images):
            mask = image_attention_mask(input_ids, self.image_token_id, self.tokenizer.eos_token_id, max_images)
        else:  # text only: no position sees an image
            mask = torch.zeros(*input_ids.shape, 1, dtype=torch.bool)
        features = BatchFeature(input_ids=input_ids)
        if masks is not None:
            features["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        features.update(pixel_values=torch.from_numpy(stack_same_shapes(padded)), image_attention_mask=mask)
        return features

    # --- chat ----------------------------------------------------------------------------------
    chat_content_as_blocks = False  # IDEFICS's template reads plain-string contents as they are

    def encode_chat(self, prompts: list[str], conversations: list[list[dict]], call_options: dict) -> BatchFeature:
        """Each image block of the messages (``image``/``url``/``path``/``base64``) becomes an image
        exactly where the template writes the image token ``<image>``."""
        samples = [self._chat_items(text, media_from_messages(messages, "image"), row)
                   for row, (text, messages) in enumerate(zip(prompts, conversations))]
        options = sort_call_options(call_options, family_text=_TEXT_OPTIONS, family_images=_IMAGE_OPTIONS)
        return self._encode(samples, options.text, options.images)

    def _chat_items(self, rendered: str, images: list, row: int) -> list[tuple[str, object]]:
        bos = self.tokenizer.bos_token
        if bos and rendered.startswith(bos):  # the processor writes BOS itself
            rendered = rendered[len(bos):]
        pieces = rendered.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise InputError(f"conversation {row}: the chat template wrote {len(pieces) - 1} image token(s) "
                             f"({IMAGE_TOKEN}) for {len(images)} image block(s); they must match")
        items = [("text", pieces[0])] if pieces[0] else []
        for image, piece in zip(images, pieces[1:]):
            items.append(("image", image))
            if piece:
                items.append(("text", piece))
        return items


def _prompts_from_arguments(images, text) -> list[list]:
    """The batch of prompts (each a list of items) from the call's ``images``/``text`` arguments."""
    if images is not None and text is not None:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = [text] if isinstance(text, str) else list(text)
        if len(texts) != len(images):
            raise InputError(f"with both images and text, give one text per prompt and that prompt's images "
                             f"(images=[[img1, img2], [img3]], text=[prompt1, prompt2]); got {len(texts)} text(s) "
                             f"and {len(images)} image entries")
        if not all(isinstance(t, str) for t in texts):
            raise InputError("with both images and text, each text must be a string")
        if images and isinstance(images[0], (list, tuple)):
            prompts = [[t, *group] for group, t in zip(images, texts)]
        else:
            prompts = [[image, t] for image, t in zip(images, texts)]
    else:
        prompts = text if text is not None else images
    if prompts is None:
        raise InputError("IdeficsProcessor needs a prompt: a list of texts, images and image URLs (or a list of them)")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        prompts = [prompts]  # one item (the reference would iterate a string's characters)
    if not prompts:
        raise InputError("the prompt list is empty: give at least one text, image or image URL")
    if not any(isinstance(p, (list, tuple)) for p in prompts):
        prompts = [prompts]  # one prompt, not a batch
    prompts = [list(p) if isinstance(p, (list, tuple)) else [p] for p in prompts]
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {row} of the batch is empty: give at least one text, image or image URL")
    return prompts


def _classify(item, row: int, col: int) -> tuple[str, object]:
    """("text", str) or ("image", source): a string is an image when it is a URL (after the reference's
    stripping of spaces), text otherwise."""
    if isinstance(item, str):
        item = item.strip(" ")
        return ("image", item) if is_url(item) else ("text", item)
    if isinstance(item, _IMAGE_TYPES):
        return "image", item
    raise InputError(f"item {col} of prompt {row} is a {type(item).__name__}: each item must be text (str), an "
                     f"image (PIL.Image, numpy array, torch tensor) or an image URL (http:// or https://)")


def image_attention_mask(input_ids: torch.Tensor, image_token_id: int, eos_token_id: int | None,
                         num_images: int) -> torch.Tensor:
    """[batch, T, num_images] int64: 1 where a token may attend to an image.

    A token sees the latest image at or before it (so tokens before any image see none), except after
    an end-of-sequence token, until the next image; images past ``num_images`` are seen by nobody."""
    indices = []
    for row in input_ids.tolist():
        count, seen_eos, row_indices = -1, False, []
        for token in row:
            if token == image_token_id:
                count, seen_eos = count + 1, False
            row_indices.append(-1 if seen_eos else count)
            if token == eos_token_id:
                seen_eos = True
        indices.append(row_indices)
    index = torch.tensor(indices, dtype=torch.long)
    index[index >= num_images] = -1
    one_hot = torch.nn.functional.one_hot(index.clamp(min=0), num_classes=num_images)
    return one_hot.masked_fill((index < 0)[..., None], 0)
