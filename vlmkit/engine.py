"""The small native API under the transformers-shaped classes: load a checkpoint once, then chat
about images or draw images. The CLI and the server both call this."""

from dataclasses import dataclass

import torch

from .auto import family_of
from .errors import InputError
from .generation.image_step import MAX_GUIDANCE_SCALE
from .generation.sampling import GREEDY_BELOW
from .generation.streaming import TextStreamer


@dataclass
class ChatResult:
    """One answer: its text, token counts and why it ended ("stop" or "length")."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Engine:
    """A loaded model with its processor."""

    def __init__(self, model, processor, model_type: str):
        self.model = model
        self.processor = processor
        self.model_type = model_type

    @classmethod
    def load(cls, name_or_path, dtype="auto", device=None, quantize=None) -> "Engine":
        """Load any supported checkpoint (folder or cached hub id) onto ``device`` (default: CUDA when there
        is one, else the CPU); ``quantize``: None, "int8" or "int4"
        (vlmkit's weight-only layers) or anything ``from_pretrained``'s ``quantization_config`` takes."""
        model_type, model_class, processor_class = family_of(name_or_path)
        model = model_class.from_pretrained(name_or_path, dtype=dtype, device_map=device or "auto",
                                            quantization_config=quantize)
        return cls(model, processor_class.from_pretrained(name_or_path), model_type)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def can_generate_images(self) -> bool:
        return self.model_type in ("janus", "multi_modality") and getattr(self.model, "has_generation_weights", False)

    def prepare_chat(self, messages: list[dict], add_generation_prompt: bool = True, **processor_options):
        """Model inputs for a conversation in content-block form (images as PIL/paths/URLs); options as
        ``apply_chat_template`` takes them (``continue_final_message``, template variables, processor options)."""
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=True, return_tensors="pt",
                                                    **processor_options)
        return inputs.to(self.model.device, dtype=self.model.dtype)

    def text_inputs(self, token_ids: list[int]) -> dict:
        """Model inputs for a prompt of token ids alone, with no image (a text completion's)."""
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def chat(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, on_text=None, **processor_options) -> ChatResult:
        """Answer the last user turn. ``temperature`` 0 is greedy; ``on_text(chunk)`` streams the answer."""
        inputs = self.prepare_chat(messages, **processor_options)
        prompt_length = inputs["input_ids"].shape[1]
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature  # as the server: no overflow
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, on_text=on_text, skip_special_tokens=True) \
            if on_text is not None else None
        options = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=repetition_penalty,
                       seed=seed, stop_strings=stop or None)
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        extra = {"generation_mode": "text"} if self.model_type in ("janus", "multi_modality") else {}
        output = self.model.generate(**inputs, **options, **extra, streamer=streamer, tokenizer=self.tokenizer)
        new_tokens = output[0, prompt_length:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        for s in stop or []:
            text = text.split(s)[0] if s in text else text
        eos = set(self.model.generation_config.eos_token_ids)
        finished = len(new_tokens) < max_new_tokens or (len(new_tokens) and int(new_tokens[-1]) in eos) \
            or any(s in text for s in stop or [])
        return ChatResult(text, prompt_length, int(len(new_tokens)), "stop" if finished else "length")

    def imagine(self, prompt: str, n: int = 1, *, seed: int | None = None, guidance_scale: float | None = None,
                temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                max_batch_images: int | None = None, on_step=None) -> list:
        """Draw ``n`` images for a text prompt (Janus). Guidance and temperature default to the
        checkpoint's ``generation_config.json`` (else DeepSeek's CFG 5, temperature 1); the full
        softmax (no top-k)."""
        if not self.can_generate_images:
            raise InputError("this model cannot generate images (only Janus checkpoints with generation weights can)")
        if not prompt or not prompt.strip():
            raise InputError("the image prompt is empty")
        if n < 1:
            raise InputError("n must be at least 1")
        if guidance_scale is not None and not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise InputError(f"guidance_scale must be from 0 to {MAX_GUIDANCE_SCALE:g}, got {guidance_scale}")
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt.strip()}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=text, generation_mode="image", return_tensors="pt")
        # below GREEDY_BELOW the draw is the argmax (dividing by the temperature would overflow)
        greedy = temperature is not None and temperature < GREEDY_BELOW
        tokens = self.model.generate(**inputs, generation_mode="image", do_sample=not greedy, num_return_sequences=n,
                                     seed=seed, guidance_scale=guidance_scale,
                                     temperature=None if greedy else temperature,
                                     top_k=top_k, top_p=top_p, max_batch_images=max_batch_images, on_step=on_step)
        images = []
        for start in range(0, tokens.shape[0], max_batch_images or tokens.shape[0]):
            pixels = self.model.decode_image_tokens(tokens[start:start + (max_batch_images or tokens.shape[0])])
            images += self.processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
        return images


def default_max_batch_images(model) -> int:
    """How many images to generate at once so a 24 GiB machine never runs out of memory: the KV cache
    of 2 rows (CFG) per image at full length, within a quarter of free memory."""
    text = model.text_model.config
    length = model.num_image_tokens + 256
    bytes_per_image = 2 * 2 * text.num_hidden_layers * text.kv_heads * text.attention_head_dim * length * \
        torch.finfo(model.dtype).bits // 8
    budget = 4 * 1024**3
    return max(1, min(16, budget // max(bytes_per_image, 1)))
