"""LLaVA-OneVision against transformers 5.23 on tiny random checkpoints: processor outputs identical,
fp32 logits within 1e-4 and greedy generations token-identical, for one image, two images in one
prompt, a padded batch of conversations and an 8-frame video; the anyres token count always equals
the features the model makes; bad inputs give clear errors.

How the video reference is built: transformers' video processor needs torchvision (and torchcodec to
decode), neither of which imports here. ``builders.llava_onevision.reference_processor`` runs
transformers' own ``LlavaOnevisionVideoProcessor`` with only the four torchvision/torchcodec calls
replaced by what they compute on a CPU (transformers' own PyAV reader; torch's native uint8 bicubic
antialiased resize, which torchvision 0.28 dispatches uint8 bicubic to; ``(x - mean) / std``). The
pixel values are also checked against the reference *image* processor's PIL resize / rescale /
normalise steps, which differ from torchvision's resize on under 1% of values by a level or two (PIL
and torch round bicubic differently).
"""

from __future__ import annotations

import math
import random
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import InputError, MediaError
from vlmkit.models.llava_onevision import anyres

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

NEW_TOKENS = 32
CHAT = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


def pattern_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic RGB image: two gradients and noise (PIL size is width x height)."""
    rng = np.random.default_rng(seed)
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(255, 0, height)[:, None], (height, width))
    noise = rng.integers(0, 256, (height, width))
    return Image.fromarray(np.stack([x, y, noise], axis=-1).round().astype(np.uint8), "RGB")


def user(*blocks) -> dict:
    return {"role": "user", "content": list(blocks)}


def image_block(image) -> dict:
    return {"type": "image", "image": image}


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def assert_same_features(expected, actual):
    assert list(expected.keys()) == list(actual.keys())
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def assert_same_outputs(reference, vlmkit, inputs_ref, inputs_vlm):
    """fp32 logits within 1e-4 (on real tokens) and identical greedy generations."""
    (_, ref_model), (_, vlm_model) = reference, vlmkit
    with torch.no_grad():
        expected = ref_model(**inputs_ref).logits
        actual = vlm_model(**inputs_vlm).logits
    mask = inputs_ref["attention_mask"].bool()
    assert expected.shape == actual.shape
    assert (expected[mask] - actual[mask]).abs().max().item() < 1e-4
    expected_ids = ref_model.generate(**inputs_ref, max_new_tokens=NEW_TOKENS, do_sample=False)
    actual_ids = vlm_model.generate(**inputs_vlm, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(expected_ids, actual_ids)
    return actual_ids


# ----------------------------------------------------------------------------------------- processor

IMAGE_SIZES = [(2000, 100), (100, 2000), (1, 1), (1600, 1200), (42, 42), (43, 41), (40, 60), (500, 400),
               (3, 5), (300, 17), (84, 252), (777, 333)]  # PIL (width, height)


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{w}x{h}" for w, h in IMAGE_SIZES])
def test_processor_matches_reference_for_image_sizes(onevision_reference, onevision_vlmkit, size):
    reference, vlmkit = onevision_reference[0], onevision_vlmkit[0]
    image = pattern_image(*size)
    prompt = reference.apply_chat_template([user(image_block(image), text_block("What is shown?"))],
                                           add_generation_prompt=True)
    assert prompt == vlmkit.apply_chat_template([user(image_block(image), text_block("What is shown?"))],
                                                add_generation_prompt=True)
    expected = reference(text=prompt, images=image, return_tensors="pt")
    actual = vlmkit(text=prompt, images=image, return_tensors="pt")
    assert_same_features(expected, actual)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_processor_converts_modes_as_reference(onevision_reference, onevision_vlmkit, mode):
    image = pattern_image(70, 30, seed=3).convert(mode)
    prompt = "<|im_start|>user\n<image>\nColours?<|im_end|>\n"
    expected = onevision_reference[0](text=prompt, images=image, return_tensors="pt")
    assert_same_features(expected, onevision_vlmkit[0](text=prompt, images=image, return_tensors="pt"))


def test_processor_multi_image_and_flat_lists_match_reference(onevision_reference, onevision_vlmkit):
    reference, vlmkit = onevision_reference[0], onevision_vlmkit[0]
    first, second = pattern_image(90, 30, 1), pattern_image(20, 70, 2)
    conversation = [user(image_block(first), image_block(second), text_block("Which is wider?"))]
    assert_same_features(reference.apply_chat_template(conversation, **CHAT),
                         vlmkit.apply_chat_template(conversation, **CHAT))
    prompt = "<image>\n<image>\nCompare."
    for images in ([first, second], [[first, second]]):  # flat: both tiled; nested: one multi-image prompt
        assert_same_features(reference(text=prompt, images=images, return_tensors="pt"),
                             vlmkit(text=prompt, images=images, return_tensors="pt"))


def test_chat_template_renders_as_reference(onevision_reference, onevision_vlmkit):
    conversation = [user(image_block(None), text_block("What is this?")),
                    {"role": "assistant", "content": [text_block("A sign.")]},
                    user(text_block("And the colour?"), {"type": "video", "path": "x.mp4"})]
    for add in (True, False):
        assert (onevision_vlmkit[0].apply_chat_template(conversation, add_generation_prompt=add)
                == onevision_reference[0].apply_chat_template(conversation, add_generation_prompt=add))


# --------------------------------------------------------------------------------- anyres counts

def _reference_feature_count(grid: int, tile: int, pinpoints, height: int, width: int) -> int:
    """transformers' LlavaOnevisionProcessor._get_number_of_features, run on a bare namespace."""
    from transformers import LlavaOnevisionProcessor

    namespace = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
                                num_image_tokens=grid * grid, vision_aspect_ratio="anyres_max_9")
    namespace._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, namespace)
    return LlavaOnevisionProcessor._get_number_of_features(namespace, height, width, tile, tile)


def random_sizes(count: int, seed: int, largest: int = 4000) -> list[tuple[int, int]]:
    """(height, width) pairs, log-uniform from 1 to ``largest``, extreme aspect ratios included."""
    rng = random.Random(seed)
    return [(max(1, int(math.exp(rng.uniform(0, math.log(largest))))),
             max(1, int(math.exp(rng.uniform(0, math.log(largest)))))) for _ in range(count)]


def test_anyres_token_count_matches_reference_arithmetic_at_real_sizes():
    """The real checkpoints' numbers (384 px tiles, 27 x 27 grid, 36 pinpoints) on 3000 sizes."""
    from vlmkit.models.llava_onevision.config import DEFAULT_GRID_PINPOINTS

    for height, width in random_sizes(3000, seed=1, largest=8000):
        expected = _reference_feature_count(27, 384, DEFAULT_GRID_PINPOINTS, height, width)
        assert anyres.image_token_count((height, width), DEFAULT_GRID_PINPOINTS, 384, 27, 9) == expected


def test_anyres_token_count_matches_features_for_any_size(onevision_vlmkit):
    processor, model = onevision_vlmkit
    sizes = random_sizes(120, seed=2, largest=3000) + [(1, 3000), (3000, 1), (1, 1), (42, 43), (252, 252)]
    for index, (height, width) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (index % 256, 80, 160))
        multi = index % 5 == 0  # every fifth goes in as a two-image prompt (no tiling)
        images = [[image, image]] if multi else image
        inputs = processor(text="<image>" * (2 if multi else 1) + "Hi", images=images, return_tensors="pt")
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                inputs["batch_num_images"])
        tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert tokens == sum(f.shape[0] for f in features), (height, width, multi)


# ------------------------------------------------------------------------------------ model parity

def test_one_image_matches_reference(onevision_reference, onevision_vlmkit):
    image = pattern_image(120, 80, seed=4)
    conversation = [user(image_block(image), text_block("What is shown in this image?"))]
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, **CHAT)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template(conversation, **CHAT)
    assert_same_features(inputs_ref, inputs_vlm)
    assert_same_outputs(onevision_reference, onevision_vlmkit, inputs_ref, inputs_vlm)
    # the image reaches the answer: another image changes the logits
    other = onevision_vlmkit[0].apply_chat_template([user(image_block(pattern_image(120, 80, seed=5)),
                                                          text_block("What is shown in this image?"))], **CHAT)
    with torch.no_grad():
        model = onevision_vlmkit[1]
        assert not torch.allclose(model(**inputs_vlm).logits[0, -1], model(**other).logits[0, -1], atol=1e-3)


def test_processor_call_form_matches_reference(onevision_reference, onevision_vlmkit):
    image = pattern_image(300, 200, seed=6)
    prompt = onevision_vlmkit[0].apply_chat_template([user(text_block("What is shown in this image?"),
                                                           image_block(None))], add_generation_prompt=True)
    inputs_ref = onevision_reference[0](text=prompt, images=image, return_tensors="pt")
    inputs_vlm = onevision_vlmkit[0](text=prompt, images=image, return_tensors="pt")
    assert_same_features(inputs_ref, inputs_vlm)
    assert_same_outputs(onevision_reference, onevision_vlmkit, inputs_ref, inputs_vlm)


def test_two_images_in_one_prompt_match_reference(onevision_reference, onevision_vlmkit):
    conversation = [user(image_block(pattern_image(64, 64, 7)), image_block(pattern_image(200, 50, 8)),
                         text_block("What differs between the two images?"))]
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, **CHAT)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template(conversation, **CHAT)
    assert_same_features(inputs_ref, inputs_vlm)
    assert inputs_vlm["batch_num_images"].tolist() == [2]
    assert_same_outputs(onevision_reference, onevision_vlmkit, inputs_ref, inputs_vlm)


def test_padded_batch_of_two_conversations_matches_reference(onevision_reference, onevision_vlmkit):
    first = [user(image_block(pattern_image(100, 60, 9)), text_block("What is shown in this image?")),
             {"role": "assistant", "content": [text_block("There is a red stop sign in the image.")]},
             user(image_block(pattern_image(48, 96, 10)), text_block("What about this image? How many cats?"))]
    second = [user(image_block(pattern_image(500, 90, 11)), text_block("What is shown in this image?"))]
    options = dict(CHAT, padding=True, padding_side="left")
    inputs_ref = onevision_reference[0].apply_chat_template([first, second], **options)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template([first, second], **options)
    assert_same_features(inputs_ref, inputs_vlm)
    assert not inputs_vlm["attention_mask"][:, 0].all()  # the shorter row is padded on the left
    output = assert_same_outputs(onevision_reference, onevision_vlmkit, inputs_ref, inputs_vlm)
    texts = onevision_vlmkit[0].batch_decode(output, skip_special_tokens=True)
    assert texts[0].startswith("user\n\nWhat is shown in this image?\nassistant\nThere is a red stop sign")


def test_loss_matches_reference(onevision_reference, onevision_vlmkit):
    conversation = [user(image_block(pattern_image(80, 80, 12)), text_block("Describe.")),
                    {"role": "assistant", "content": [text_block("A gradient with noise.")]}]
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, **CHAT)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template(conversation, **CHAT)
    labels = inputs_vlm["input_ids"].masked_fill(inputs_vlm["input_ids"] == onevision_vlmkit[0].image_token_id, -100)
    with torch.no_grad():
        expected = onevision_reference[1](**inputs_ref, labels=labels).loss
        actual = onevision_vlmkit[1](**inputs_vlm, labels=labels).loss
    assert abs(expected.item() - actual.item()) < 1e-5


def test_tied_head_and_multi_layer_features_match_reference(llava_onevision_tied_dir):
    from builders.llava_onevision import reference_processor
    from transformers import LlavaOnevisionForConditionalGeneration as ReferenceModel

    from vlmkit.models.llava_onevision import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    reference = (reference_processor(llava_onevision_tied_dir),
                 ReferenceModel.from_pretrained(llava_onevision_tied_dir, dtype=torch.float32).eval())
    vlmkit = (LlavaOnevisionProcessor.from_pretrained(llava_onevision_tied_dir),
              LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_tied_dir, dtype=torch.float32))
    assert vlmkit[1].lm_head.weight is vlmkit[1].text_model.embed_tokens.weight
    conversation = [user(image_block(pattern_image(150, 70, 13)), text_block("What is shown?"))]
    inputs_ref = reference[0].apply_chat_template(conversation, **CHAT)
    inputs_vlm = vlmkit[0].apply_chat_template(conversation, **CHAT)
    assert_same_features(inputs_ref, inputs_vlm)
    assert_same_outputs(reference, vlmkit, inputs_ref, inputs_vlm)


def test_llava_hf_hub_layout_loads_the_same(llava_onevision_dir, onevision_reference, tmp_path):
    from builders.llava_onevision import write_llava_hf_v4_layout

    from vlmkit.models.llava_onevision import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    legacy = write_llava_hf_v4_layout(llava_onevision_dir, tmp_path / "legacy")
    processor = LlavaOnevisionProcessor.from_pretrained(legacy)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(legacy, dtype=torch.float32)
    conversation = [user(image_block(pattern_image(60, 130, 14)), text_block("What is shown?"))]
    inputs = processor.apply_chat_template(conversation, **CHAT)
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, **CHAT)
    assert_same_features(inputs_ref, inputs)
    with torch.no_grad():
        assert (model(**inputs).logits - onevision_reference[1](**inputs_ref).logits).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- video

def test_video_pixels_match_reference_video_and_image_processors(onevision_reference, onevision_vlmkit,
                                                                 onevision_videos):
    conversation = [user({"type": "video", "path": str(onevision_videos["clip"])},
                         text_block("Why is this video funny?"))]
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, num_frames=8, **CHAT)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template(conversation, num_frames=8, **CHAT)
    assert_same_features(inputs_ref, inputs_vlm)
    videos = inputs_vlm["pixel_values_videos"]
    assert videos.shape == (1, 8, 3, 42, 42)
    assert int((inputs_vlm["input_ids"] == onevision_vlmkit[0].video_token_id).sum()) == 8 * 3 * 3 + 1

    # the reference image processor's PIL steps on the same frames agree but for rounding: under 1% of
    # values differ, by one level of 255 (rarely two)
    from vlmkit.io.video import load_video

    image_processor = onevision_reference[0].image_processor
    for frame, actual in zip(load_video(str(onevision_videos["clip"]), 8), videos[0]):
        pixels = image_processor.resize(frame.transpose(2, 0, 1), size=image_processor.size, resample=3)
        expected = image_processor.normalize(image_processor.rescale(pixels, 1 / 255), [0.5] * 3, [0.5] * 3)
        levels = np.abs(expected - actual.numpy()) * 127.5
        assert levels.max() < 2.01 and (levels > 0.01).mean() < 0.01


def test_eight_frame_video_matches_reference(onevision_reference, onevision_vlmkit, onevision_videos):
    conversation = [user({"type": "video", "path": str(onevision_videos["clip"])},
                         text_block("Why is this video funny?"))]
    inputs_ref = onevision_reference[0].apply_chat_template(conversation, num_frames=8, **CHAT)
    inputs_vlm = onevision_vlmkit[0].apply_chat_template(conversation, num_frames=8, **CHAT)
    assert_same_outputs(onevision_reference, onevision_vlmkit, inputs_ref, inputs_vlm)


# ------------------------------------------------------------------------------------------ errors

def test_corrupt_video_is_a_media_error(onevision_vlmkit, onevision_videos):
    with pytest.raises(MediaError, match="corrupt|not a video"):
        onevision_vlmkit[0](text="<video>\nWhat?", videos=str(onevision_videos["corrupt"]), num_frames=8)


def test_zero_frame_video_is_a_media_error(onevision_vlmkit, onevision_videos):
    with pytest.raises(MediaError, match="zero frames"):
        onevision_vlmkit[0](text="<video>\nWhat?", videos=str(onevision_videos["empty"]), num_frames=8)


def test_more_image_tokens_than_images_is_an_input_error(onevision_vlmkit):
    processor, model = onevision_vlmkit
    with pytest.raises(InputError, match="2 image placeholder"):
        processor(text="<image><image>\nCompare.", images=pattern_image(50, 50), return_tensors="pt")
    with pytest.raises(InputError, match=r"0 image\(s\) were given"):
        processor(text="<image>\nWhat?")
    with pytest.raises(InputError, match=r"1 video placeholder.*0 video\(s\)"):
        processor(text="<video>\nWhat?", images=None)
    # model side: placeholders that the given pixels do not fill
    inputs = processor(text="<image>\nWhat?", images=pattern_image(50, 50), return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.full((1, 3), processor.image_token_id)], dim=1)
    with pytest.raises(InputError, match="image tokens but"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(InputError, match="no image pixels"):
        model(input_ids=inputs["input_ids"])


def test_image_tokens_overflowing_the_context_are_an_input_error(onevision_vlmkit):
    processor, model = onevision_vlmkit
    big = pattern_image(1000, 1000, 15)  # 265 tokens each (base 25 + 15 rows of 15 + newline)
    inputs = processor(text="<image>" * 4 + "\nDescribe all four.", images=[big] * 4, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > model.max_context
    with pytest.raises(InputError, match="context"):
        model.generate(**inputs, max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        model(**inputs)


def test_an_image_too_elongated_for_anyres_max_1_is_an_input_error(llava_onevision_dir, tmp_path):
    """Its features would shrink to zero rows (transformers' interpolation fails on it with a torch error)."""
    import json
    import shutil

    from vlmkit import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    folder = shutil.copytree(llava_onevision_dir, tmp_path / "max1")
    for path in folder.glob("*.json"):  # the model's config and the image processor's: a wide 1 x 10 tile grid
        values = json.loads(path.read_text())
        for holder in [values, *(v for v in values.values() if isinstance(v, dict))]:
            if "image_grid_pinpoints" in holder:
                holder["image_grid_pinpoints"] = [[42, 42], [42, 420]]
        if "vision_aspect_ratio" in values:
            values["vision_aspect_ratio"] = "anyres_max_1"
        path.write_text(json.dumps(values))
    processor = LlavaOnevisionProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    inputs = processor(text="<image>\nWhat?", images=pattern_image(2000, 40), return_tensors="pt")
    with pytest.raises(InputError, match="too elongated for this checkpoint's anyres_max_1"):
        model(**inputs)
    model(**processor(text="<image>\nWhat?", images=pattern_image(60, 40), return_tensors="pt"))


def test_auto_classes_pick_the_family(llava_onevision_dir):
    import vlmkit

    assert type(vlmkit.AutoProcessor.from_pretrained(llava_onevision_dir)).__name__ == "LlavaOnevisionProcessor"
    assert vlmkit.LlavaOnevisionForConditionalGeneration.__module__.startswith("vlmkit.models.llava_onevision")
