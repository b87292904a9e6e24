"""Tiny random LLaVA-OneVision checkpoints for tests, in the llava-hf layout.

`build_tiny_llava_onevision(out_dir)` writes what `llava-hf/llava-onevision-qwen2-*-hf` repos hold
(config.json with a SigLIP vision config and a Qwen2 text config, model.safetensors, tokenizer,
preprocessor/processor configs, video preprocessor config, chat template), written by
`transformers` itself so that its `LlavaOnevisionForConditionalGeneration` / `LlavaOnevisionProcessor`
are the reference.

Sizes mimic the real model where it matters for the anyres arithmetic: SigLIP-so400m takes 384 px
with 14 px patches, which do not divide 384 (27 patches per side, the last 6 pixels unused, an odd
grid); here 42 px with 8 px patches gives 5 patches per side, 2 pixels unused, also odd. The grid
pinpoints are the anyres_max_9 ones (multiples of 384 up to 6 x 384) scaled to 42.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .janus import _randomize_
from vlmkit.bench.tokenizer import build_tokenizer

__all__ = ["ONEVISION_CHAT_TEMPLATE", "IMAGE_TOKEN", "VIDEO_TOKEN", "build_tiny_llava_onevision",
           "scaled_pinpoints", "reference_processor", "video_processor_class_registered", "write_llava_hf_v4_layout"]

# The chat template the llava-hf OneVision checkpoints were converted with: `chat_template` of
# transformers' src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py
# (same Python string pieces, so the '\n' escapes become the same characters). It renders
# "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n", which decodes to the
# transformers doc's 'user\n\nWhat is shown in this image?\nassistant\n...'. Checkpoint data: do not "fix" it.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
# Qwen2's added tokens in their real relative order (151643...), then the two LLaVA placeholders
# (151646, 151647 in the real vocabulary).
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]


@contextlib.contextmanager
def video_processor_class_registered():
    """Let transformers build a processor that has a video processor while torchvision is absent.

    ``ProcessorMixin`` checks each sub-processor against ``transformers.VideoProcessorMixin``, a name
    the lazy top-level module only exports when torchvision imports; the class itself (and
    ``LlavaOnevisionVideoProcessor``) import and construct fine without it. Only the lookup is
    patched, for the duration of the block; no processing code is touched."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    missing = "VideoProcessorMixin" not in transformers.__dict__
    if missing:
        setattr(transformers, "VideoProcessorMixin", VideoProcessorMixin)
    try:
        yield
    finally:
        if missing:
            delattr(transformers, "VideoProcessorMixin")


def scaled_pinpoints(image_size: int) -> list[list[int]]:
    """anyres_max_9's grid pinpoints ([384 * i, 384 * j], i, j in 1..6) with 384 replaced by ``image_size``."""
    return [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]


def build_tiny_llava_onevision(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 42,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_num_layers: int = 2,
    vision_num_heads: int = 2,
    text_hidden_size: int = 64,
    text_num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    vision_feature_layer: int | list[int] = -1,
    tokenizer_vocab_size: int = 600,
) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint; returns ``out_dir``.

    Loadable with transformers' ``LlavaOnevisionForConditionalGeneration.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir, backend="pil")`` (images; its video processor needs
    torchvision, see tests/test_llava_onevision.py for how video is checked)."""
    from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = image_size // patch_size

    # --- tokenizer: byte-level BPE like Qwen2's, no BOS, <|im_end|> ends a turn ------------------
    tok_path = build_tokenizer(out_dir, special_tokens=SPECIAL_TOKENS, bos=None, eos=IM_END, pad=ENDOFTEXT,
                               vocab_size=tokenizer_vocab_size, add_bos=False, seed=seed)
    # The generic fast class (see builders/janus.py for why): transformers uses tokenizer.json as is.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token=None, eos_token=IM_END,
                                        pad_token=ENDOFTEXT, unk_token=None, model_max_length=32768,
                                        clean_up_tokenization_spaces=False,
                                        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # the real vocabulary is padded past the tokenizer too

    # --- config ---------------------------------------------------------------------------------
    vision_config = SiglipVisionConfig(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                                       num_hidden_layers=vision_num_layers, num_attention_heads=vision_num_heads,
                                       image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text_config = Qwen2Config(vocab_size=vocab_size, hidden_size=text_hidden_size,
                              intermediate_size=intermediate_size, num_hidden_layers=text_num_layers,
                              num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                              max_position_embeddings=max_position_embeddings, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
                              bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    config = LlavaOnevisionConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                                  image_token_index=ids[IMAGE_TOKEN], video_token_index=ids[VIDEO_TOKEN],
                                  vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=scaled_pinpoints(image_size),
                                  vision_aspect_ratio="anyres_max_9", tie_word_embeddings=tie_word_embeddings)

    # --- model ----------------------------------------------------------------------------------
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _randomize_(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                                               pad_token_id=ids[ENDOFTEXT])
    model.save_pretrained(out_dir)

    # --- processor ------------------------------------------------------------------------------
    image_settings = dict(size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5],
                          image_std=[0.5, 0.5, 0.5], resample=3, do_resize=True, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    image_processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=scaled_pinpoints(image_size), do_pad=True,
                                                      **image_settings)
    video_processor = LlavaOnevisionVideoProcessor(**image_settings)
    with video_processor_class_registered():
        processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=video_processor, num_image_tokens=grid * grid,
                                            vision_feature_select_strategy="full",
                                            chat_template=ONEVISION_CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")
        processor.save_pretrained(out_dir)
    return out_dir


def reference_processor(folder: str | os.PathLike):
    """transformers' ``LlavaOnevisionProcessor`` for ``folder``, images through its PIL backend.

    ``AutoProcessor.from_pretrained(folder, backend="pil")`` cannot be used: it also loads the video
    processor, which exists only on the torchvision backend, and neither torchvision nor torchcodec
    imports here. So the sub-processors are loaded one by one and put together by transformers' own
    ``from_args_and_dict``, the video processor being ``ReferenceVideoProcessor`` (see there)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

    processor_dict, kwargs = LlavaOnevisionProcessor.get_processor_dict(str(folder))
    args = [AutoImageProcessor.from_pretrained(str(folder), backend="pil"), AutoTokenizer.from_pretrained(str(folder)),
            _reference_video_processor_class().from_pretrained(str(folder))]
    with video_processor_class_registered():
        return LlavaOnevisionProcessor.from_args_and_dict(args, processor_dict, **kwargs)


def _reference_video_processor_class():
    """transformers' ``LlavaOnevisionVideoProcessor`` with the four calls that need torchvision or
    torchcodec replaced by what those libraries compute for this input on a CPU; everything else
    (frame sampling, tensor layout, grouping, the fused rescale/normalise constants, output shapes)
    is transformers' own code:

    * ``fetch_videos``: transformers' own ``video_utils.load_video`` with its ``"pyav"`` backend
      (the same FFmpeg decode) instead of torchcodec;
    * ``convert_to_rgb``: skips ``tvF.grayscale_to_rgb``, a no-op for the 3-channel frames used;
    * ``resize``: torchvision 0.28's ``resize_image`` for uint8 bicubic on the CPU is torch's native
      uint8 antialiased interpolation (``_do_native_uint8_resize_on_cpu`` returns True for BICUBIC),
      with an early return when the size is unchanged; that is exactly what is run here;
    * ``normalize``: torchvision's ``normalize_image``, ``(x - mean) / std`` per channel in float32.
    """
    import torch
    from torch.nn import functional as F
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
    from transformers.video_utils import convert_to_rgb, load_video

    class ReferenceVideoProcessor(LlavaOnevisionVideoProcessor):
        def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
            if isinstance(video_url_or_urls, list):
                return list(zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn)
                                  for x in video_url_or_urls]))
            return load_video(video_url_or_urls, backend="pyav", sample_indices_fn=sample_indices_fn)

        def convert_to_rgb(self, video):
            from transformers.image_utils import ChannelDimension

            if video.shape[-3] != 3:
                raise ValueError("the reference video processor here handles 3-channel frames only")
            return convert_to_rgb(video, input_data_format=ChannelDimension.FIRST)

        def resize(self, image, size, resample=None, antialias=True, **kwargs):
            if image.dtype != torch.uint8 or int(resample) != 3 or image.device.type != "cpu":
                raise ValueError("the reference video processor here covers uint8 bicubic resizing on the CPU only")
            channels, height, width = image.shape[-3:]
            if (height, width) == (size.height, size.width):
                return image
            out = F.interpolate(image.reshape(-1, channels, height, width), size=(size.height, size.width),
                                mode="bicubic", antialias=antialias, align_corners=False)
            return out.reshape(image.shape[:-3] + (channels, size.height, size.width))

        def normalize(self, image, mean, std, inplace=False, **kwargs):
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return image.sub(mean).div_(std)

    return ReferenceVideoProcessor


def write_llava_hf_v4_layout(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The checkpoint in ``src`` as the llava-hf hub repos hold it (written by transformers 4.4x): the
    SigLIP layers under ``vision_tower.vision_model.``, and separate ``preprocessor_config.json``,
    ``video_preprocessor_config.json``, ``chat_template.json`` and a ``processor_config.json`` with
    only the processor's own keys, instead of transformers 5's single processor_config.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out_dir / name)
    state = load_file(str(src / "model.safetensors"))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in state.items()}
    save_file(renamed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor = json.loads((src / "processor_config.json").read_text())
    image = {**processor.pop("image_processor"), "processor_class": "LlavaOnevisionProcessor"}
    video = processor.pop("video_processor")
    video = {**{k: v for k, v in video.items() if k != "video_processor_type"},
             "image_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor"}
    for name, content in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video),
                          ("processor_config.json", processor),
                          ("chat_template.json", {"chat_template": (src / "chat_template.jinja").read_text()})):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    return out_dir
