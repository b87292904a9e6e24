"""JanusProcessor: prompts with image placeholders expanded to the image-token block, images to
pixel values, chat templates, decoding. Mirrors transformers' JanusProcessor."""



from ...errors import InputError
from ...io.checkpoint import checkpoint_location
from ...io.media import load_image
from ...io.features import as_return_type
from ...io.tokenizer import Tokenizer
from ...processing import (BatchFeature, ProcessorBase, check_media_tokens_kept, config_file, expand_placeholders,
                           flatten_images, media_from_messages, prompt_texts, sort_load_options)
from ...processor_options import sort_call_options
from .image_processing import JanusImageProcessor

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.\n\n")

IMAGE_TOKEN, BEGIN_IMAGE_TOKEN, END_IMAGE_TOKEN = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
# from_pretrained keywords for the image processor beside every family's, and for the processor itself
_IMAGE_KEYS, _PROCESSOR_KEYS = ("min_size",), ("chat_template", "use_default_system_prompt", "num_image_tokens")


class JanusProcessor(ProcessorBase):
    """Tokenizer + image processor + the Janus prompt conventions."""

    own_settings = ("use_default_system_prompt", "num_image_tokens")

    def __init__(self, image_processor: JanusImageProcessor, tokenizer: Tokenizer, chat_template: str | None = None,
                 use_default_system_prompt: bool = False, num_image_tokens: int = 576, media_policy=None):
        self.media_policy = media_policy  # limits for fetching images (None: MediaPolicy's defaults)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.use_default_system_prompt = use_default_system_prompt
        self.num_image_tokens = num_image_tokens
        self.image_token = tokenizer.special_tokens.get("image_token", IMAGE_TOKEN)
        self.image_start_token = tokenizer.special_tokens.get("boi_token", BEGIN_IMAGE_TOKEN)
        self.image_end_token = tokenizer.special_tokens.get("eoi_token", END_IMAGE_TOKEN)
        self.image_token_id = tokenizer.token_id(self.image_token)
        self.media_tokens = (self.image_token, self.image_start_token, self.image_end_token)

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str = "main", media_policy=None, **options) -> "JanusProcessor":
        """Load from a checkpoint folder (transformers or DeepSeek original layout) or the HF cache.
        ``media_policy`` (a ``vlmkit.io.media.MediaPolicy``) bounds image fetches. Other keywords override
        the checkpoint's settings, as in transformers: the image processor's (``image_mean``, ``size``...),
        the processor's (``num_image_tokens``, ``chat_template``...) and the tokenizer's (``pad_token``...)."""
        folder = checkpoint_location(name_or_path, options, revision)
        loading = sort_load_options(options, _IMAGE_KEYS, _PROCESSOR_KEYS)
        processor_config = config_file(folder, "processor_config.json")
        image_config = processor_config.get("image_processor") or config_file(folder, "preprocessor_config.json")
        model_config = config_file(folder, "config.json")
        tokenizer = Tokenizer.from_pretrained(folder, **loading.tokenizer)
        if "padding_side" not in tokenizer.config:  # the caller's or the saved setting wins, as in transformers
            tokenizer.padding_side = "left"  # Janus pads prompts on the left
        if model_config.get("model_type") == "multi_modality":
            from .original_layout import original_processor_settings
            settings = original_processor_settings(folder, model_config, processor_config,
                                                   {**image_config, **loading.image}, tokenizer)
            return cls(**{**settings, **loading.processor}, media_policy=media_policy)
        from ...io.chat_template import processor_chat_template
        # a folder without the processor's files (a model saved alone): the vision tower's own size and
        # token count, rather than the class defaults (Janus-Pro's 384 pixels, 576 tokens) it may not have
        vision = model_config.get("vision_config") if isinstance(model_config.get("vision_config"), dict) else {}
        side, patch = vision.get("image_size", 384), vision.get("patch_size", 16)
        image_processor = JanusImageProcessor.from_config({**(image_config or {"size": side}), **loading.image})
        settings = {"chat_template": processor_chat_template(folder, processor_config, tokenizer.config),
                    "use_default_system_prompt": bool(processor_config.get("use_default_system_prompt", False)),
                    "num_image_tokens": int(processor_config.get("num_image_tokens", (side // patch) ** 2)),
                    **loading.processor}
        return cls(image_processor, tokenizer, **settings, media_policy=media_policy)

    def image_block(self, _index: int = 0) -> str:
        """What one image placeholder becomes in the token stream."""
        return self.image_start_token + self.image_token * self.num_image_tokens + self.image_end_token

    def __call__(self, text=None, images=None, *, conversations=None, prompt=None, force_batchify: bool = True,
                 **kwargs) -> BatchFeature:
        """Tokenise prompt(s), expanding each ``<image_placeholder>`` to the image block, and
        preprocess the images (one per placeholder, in order). ``generation_mode="image"`` prepares a
        text-to-image prompt. Takes transformers' tokenizer and image options (``padding``,
        ``max_length``, ``do_rescale``, ``size``..., flat or as ``text_kwargs``/``images_kwargs``) and
        ``return_tensors`` "pt" (the default), "np" or None. DeepSeek's ``conversations=``/``prompt=``
        call style is accepted too."""
        if conversations is not None or prompt is not None:
            from .vlchat import vlchat_call
            return vlchat_call(self, system_prompt=DEFAULT_SYSTEM_PROMPT, prompt=prompt, conversations=conversations,
                               images=images, force_batchify=force_batchify)
        options = sort_call_options(kwargs, family_images=("min_size",), family=("generation_mode",))
        generation_mode = options.family.get("generation_mode", "text")
        if text is None:
            raise InputError("JanusProcessor needs text (a prompt, or a list of prompts)")
        texts = prompt_texts(text)
        if generation_mode == "image":
            if images is not None:
                raise InputError("Janus generates images from text only; pass no images with generation_mode='image'")
            texts = [t + self.image_start_token for t in texts]
        elif generation_mode == "text":
            if self.use_default_system_prompt:
                texts = [DEFAULT_SYSTEM_PROMPT + t for t in texts]
        elif generation_mode != "plain":  # "plain": the prompt is already complete
            raise InputError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}")
        flat_images, counts = flatten_images(images)
        texts = expand_placeholders(texts, self.image_token, counts, self.image_block, len(flat_images))
        # the tokenizer's side when its config names one (set since loading too), else Janus' left, as
        # transformers' JanusProcessor merges its defaults with the tokenizer's settings
        side = self.tokenizer.padding_side if "padding_side" in self.tokenizer.config else "left"
        features = BatchFeature(self.tokenizer(texts, **{"padding_side": side, **options.text}))
        check_media_tokens_kept(texts, features["input_ids"], {self.image_token: self.image_token_id})
        if flat_images:
            image_processor = self.image_processor.with_options(options.images)
            features["pixel_values"] = image_processor([load_image(i, self.media_policy) for i in flat_images])["pixel_values"]
        return as_return_type(features, options.return_tensors)

    def encode_chat(self, prompts: list[str], conversations: list[list[dict]], call_options: dict) -> BatchFeature:
        """The rendered prompts with the images their messages name (``url``/``path``/``image``/``base64``)."""
        images = [media_from_messages(messages, "image") for messages in conversations]
        return self(prompts, images=images if any(images) else None, **call_options)

    def postprocess(self, images, **kwargs):
        """Generated pixels back to images (see ``JanusImageProcessor.postprocess``)."""
        return self.image_processor.postprocess(images, **kwargs)

