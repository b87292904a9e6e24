"""How each benchmarked family is driven on each engine ("vlmkit", "transformers"): loading, chat
inputs, text generation, and Janus's text-to-image. Both engines get the same images and prompts;
transformers is imported only when its engine is loaded (memory probes of vlmkit never import it)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ENGINES = ("vlmkit", "transformers")
QUESTION = "Describe this image."
REPEAT_QUESTION = "What colors do you see?"
TEXT_PROMPTS = ["Write a short story about a lighthouse keeper.", "List three facts about the moon.",
                "Explain how a bicycle works.", "What is the capital of France?"]
IMAGE_PROMPT = "A photo of a red fox sitting in the snow, golden hour light."


def test_image(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic RGB picture (gradients plus noise); a new ``seed`` gives new content."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height)[:, None].repeat(width, 1)
    noise = rng.integers(0, 256, (height, width))
    return Image.fromarray(np.stack([x, y, noise], -1).round().astype(np.uint8), "RGB")


def quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class Family:
    """One checkpoint, loaded on the engines asked for; ``models[engine]`` and ``processors[engine]``."""

    name = ""
    generate_options: dict = {}

    def __init__(self, folder: Path, dtype: torch.dtype, engines=ENGINES):
        self.folder, self.dtype = Path(folder), dtype
        self.models, self.processors = {}, {}
        for engine in engines:
            self.models[engine], self.processors[engine] = self.load(engine)

    def load(self, engine: str):
        raise NotImplementedError

    def chat_inputs(self, engine: str, images: list[Image.Image], questions: str | list[str] = QUESTION):
        """A batch of conversations: one per image (each with the question), or one per question if no images."""
        if images:
            questions = [questions] * len(images) if isinstance(questions, str) else questions
            messages = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]}]
                        for image, question in zip(images, questions)]
        else:
            questions = [questions] if isinstance(questions, str) else questions
            messages = [[{"role": "user", "content": [{"type": "text", "text": q}]}] for q in questions]
        processor = self.processors[engine]
        inputs = processor.apply_chat_template(messages if len(messages) > 1 else messages[0],
                                               add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", padding=len(messages) > 1,
                                               **self.generate_options)
        return inputs.to(dtype=self.dtype)

    def preprocess(self, engine: str, image: Image.Image):
        return self.processors[engine].image_processor([image])

    def generate(self, engine: str, inputs, max_new_tokens: int, streamer=None):
        model = self.models[engine]
        # an end-of-sequence id a random model practically never picks, so every run has the same length
        never = model.config.text_config.vocab_size - 1 if engine == "transformers" else self.vocab_size - 1
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=never,
                                  streamer=streamer, **self.generate_options)

    @property
    def vocab_size(self) -> int:
        return self.models["vlmkit"].text_model.config.vocab_size if "vlmkit" in self.models else \
            self.models["transformers"].config.text_config.vocab_size

    def clear_caches(self) -> None:
        """Forget every image and prompt vlmkit has seen (transformers keeps nothing across requests)."""
        for name in ("vision_cache", "prompt_cache"):
            cache = getattr(self.models.get("vlmkit"), name, None)
            if cache is not None:
                cache.clear()

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one text decode step reads: every decoder layer, the final norm, the LM head."""
        model = self.models["vlmkit"]
        text = model.text_model
        modules = [text.layers, text.norm, model.lm_head]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class Janus(Family):
    name = "janus"
    generate_options = {"generation_mode": "text"}

    def load(self, engine):
        if engine == "vlmkit":
            from vlmkit import JanusForConditionalGeneration, JanusProcessor
            return (JanusForConditionalGeneration.from_pretrained(self.folder, dtype=self.dtype),
                    JanusProcessor.from_pretrained(self.folder))
        transformers = quiet_transformers()
        return (transformers.JanusForConditionalGeneration.from_pretrained(self.folder, dtype=self.dtype).eval(),
                transformers.JanusProcessor.from_pretrained(self.folder, backend="pil"))

    def image_prompt(self, engine):
        processor = self.processors[engine]
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": IMAGE_PROMPT}]}],
                                             add_generation_prompt=True)
        return processor(text=text, generation_mode="image", return_tensors="pt")

    def image_token_times(self, engine: str, steps: int, seed: int = 0, images: int = 1) -> tuple[float, list[float]]:
        """The image-token loop (CFG, sampling) for the first ``steps`` of the image's tokens, ``images``
        pictures of one prompt at once (each two rows with guidance): (seconds from the call to the first
        image token, which holds the prompt's prefill; the seconds between consecutive tokens, each a CFG
        step: both rows through the decoder, the guidance, the draw). vlmkit reports each token through
        ``on_step``, transformers' loop calls its logits processors once a step."""
        model, inputs = self.models[engine], self.image_prompt(engine)
        times = []

        def stamp(input_ids, scores):
            times.append(time.perf_counter())
            return scores
        start = time.perf_counter()
        with torch.no_grad(), _image_token_limit(engine, model, steps):
            if engine == "vlmkit":
                model.generate(**inputs, generation_mode="image", do_sample=True, seed=seed,
                               num_return_sequences=images, on_step=lambda done, total: stamp(None, None))
            else:
                torch.manual_seed(seed)
                model.generate(**inputs, generation_mode="image", do_sample=True, use_cache=True,
                               num_return_sequences=images,
                               logits_processor=quiet_transformers().LogitsProcessorList([stamp]))
        return times[0] - start, [b - a for a, b in zip(times, times[1:])]

    def image_loop_seconds(self, engine: str, steps: int, images: int = 1) -> float:
        """Seconds for all of an image's tokens, from a run of its first ``steps``: the prefill once, then
        every further token at the mean step time measured (exact when ``steps`` covers the image)."""
        first, gaps = self.image_token_times(engine, steps, images=images)
        return first + (self.num_image_tokens() - 1) * sum(gaps) / len(gaps)

    def num_image_tokens(self) -> int:
        model = self.models.get("vlmkit") or self.models["transformers"]
        return model.num_image_tokens if hasattr(model, "num_image_tokens") else \
            model.model.vision_model.config.num_image_tokens

    def decode_image(self, engine: str, grid: int):
        """VQ-decode a ``grid`` x ``grid`` square of random image tokens (the whole image or a part)."""
        model = self.models[engine]
        vq = model.model.vqmodel
        num_codes = vq.config.num_embeddings
        tokens = torch.randint(0, num_codes, (1, grid * grid), generator=torch.Generator().manual_seed(0))
        if engine == "vlmkit":
            full, vq.grid_side = vq.grid_side, grid
        else:
            full, vq.quantize.quant_state_dims = vq.quantize.quant_state_dims, [grid, grid]
        try:
            with torch.no_grad():
                return model.decode_image_tokens(tokens)
        finally:
            if engine == "vlmkit":
                vq.grid_side = full
            else:
                vq.quantize.quant_state_dims = full

    def image_step_weight_bytes(self) -> int:
        """Bytes of weights one image-token step reads: decoder layers, norm, generation head and aligner."""
        model = self.models["vlmkit"]
        modules = [model.text_model.layers, model.text_model.norm, model.model.generation_head,
                   model.model.generation_aligner]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@contextlib.contextmanager
def _image_token_limit(engine: str, model, steps: int):
    """Run only the first ``steps`` image tokens (for --steps): both engines read the count from one place."""
    if engine == "transformers":
        config = model.model.vision_model.config
        full, config.num_image_tokens = config.num_image_tokens, steps
        try:
            yield
        finally:
            config.num_image_tokens = full
        return
    original = type(model)
    model.__class__ = type(original.__name__, (original,), {"num_image_tokens": property(lambda self: steps)})
    try:
        yield
    finally:
        model.__class__ = original


class LlavaOnevision(Family):
    name = "llava_onevision"

    def load(self, engine):
        if engine == "vlmkit":
            from vlmkit import AutoModel, AutoProcessor
            return AutoModel.from_pretrained(self.folder, dtype=self.dtype), AutoProcessor.from_pretrained(self.folder)
        transformers = quiet_transformers()
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)
        from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
        # built from its parts: loading the video processor needs torchvision (a default one is never used here)
        processor_settings, _ = transformers.LlavaOnevisionProcessor.get_processor_dict(str(self.folder))
        with _video_processor_class_registered(transformers):
            processor = transformers.LlavaOnevisionProcessor(
                image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(self.folder),
                tokenizer=transformers.AutoTokenizer.from_pretrained(self.folder),
                video_processor=LlavaOnevisionVideoProcessor(), chat_template=(self.folder / "chat_template.jinja").read_text(),
                **{k: v for k, v in processor_settings.items()
                   if k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")})
        model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(self.folder, dtype=self.dtype)
        return model.eval(), processor


@contextlib.contextmanager
def _video_processor_class_registered(transformers):
    """transformers checks a processor's parts against ``VideoProcessorMixin``, a name its lazy module
    exports only when torchvision imports; the class itself imports fine: expose it meanwhile."""
    from transformers import processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    modules = [m for m in {id(transformers): transformers, id(processing_utils.transformers_module):
                           processing_utils.transformers_module}.values() if "VideoProcessorMixin" not in m.__dict__]
    for module in modules:
        module.VideoProcessorMixin = VideoProcessorMixin
    try:
        yield
    finally:
        for module in modules:
            delattr(module, "VideoProcessorMixin")


FAMILIES = {"janus": Janus, "llava_onevision": LlavaOnevision}
