"""LLaVA-OneVision processor calls beyond a prompt with its images: pixels without text, a call's own
grid pinpoints or non-square size (which the model refuses, where transformers' model misreads or fails),
and images without pixels; each compared with transformers' processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_llava_onevision import assert_same_features, pattern_image
from vlmkit.errors import InputError, MediaError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


def assert_same_values(expected, actual):
    """Equal keys, types, dtypes and values, for any return_tensors (None gives lists of arrays or tensors)."""
    if hasattr(expected, "keys"):  # a BatchFeature (transformers' is not a dict)
        assert list(expected.keys()) == list(actual.keys())
        for key in expected:
            assert_same_values(expected[key], actual[key])
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual)
        for item, other in zip(expected, actual):
            assert_same_values(item, other)
    else:
        assert type(expected) is type(actual)
        if isinstance(expected, torch.Tensor):
            assert expected.dtype == actual.dtype and torch.equal(expected, actual)
        elif isinstance(expected, np.ndarray):
            assert expected.dtype == actual.dtype and np.array_equal(expected, actual)
        else:
            assert expected == actual


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_processor_without_text_returns_the_reference_pixels(onevision_reference, onevision_vlmkit, return_tensors):
    reference, vlmkit = onevision_reference[0], onevision_vlmkit[0]
    first, second = pattern_image(37, 23), pattern_image(20, 70, 2)
    video = np.random.default_rng(1).integers(0, 256, (4, 30, 50, 3), dtype=np.uint8)
    for media in (dict(images=first), dict(images=[first, second]), dict(images=[[first, second]]),
                  dict(videos=video), dict(images=first, videos=[video, video])):
        assert_same_values(reference(**media, return_tensors=return_tensors),
                           vlmkit(**media, return_tensors=return_tensors))
    for nothing in (dict(), dict(images=[]), dict(videos=[])):
        with pytest.raises(InputError, match="needs text .*, images or videos"):
            vlmkit(**nothing)


def test_call_grid_pinpoints_cut_the_pixels_but_the_checkpoint_grid_counts_tokens(onevision_reference,
                                                                                 onevision_vlmkit):
    """As transformers: a call's image_grid_pinpoints cut the pixels, but the <image> tokens are counted with
    the checkpoint's pinpoints, which the model tiles with. transformers' model then reads an image's first
    patches (base + the top-left tile of the call's grid, as if it covered the whole image) and drops the rest,
    a wrong answer without an error; vlmkit's model refuses such pixels."""
    (reference, reference_model), (vlmkit, model) = onevision_reference, onevision_vlmkit
    image, prompt = pattern_image(37, 23), "<|im_start|>user <image>\nWhat?<|im_end|>"
    expected = reference(text=prompt, images=image, image_grid_pinpoints=[[84, 84]], return_tensors="pt")
    actual = vlmkit(text=prompt, images=image, image_grid_pinpoints=[[84, 84]], return_tensors="pt")
    assert_same_features(expected, actual)
    assert actual["pixel_values"].shape[1] == 5  # base + 2 x 2 tiles; the checkpoint's grid makes base + 1 tile
    with torch.no_grad():  # transformers' logits do not depend on the three patches past its grid
        noise = expected["pixel_values"].clone()
        noise[:, 2:] = torch.randn_like(noise[:, 2:])
        assert torch.equal(reference_model(**expected).logits,
                           reference_model(**{**expected, "pixel_values": noise}).logits)
    with pytest.raises(InputError, match="cut with other pinpoints"):
        model(**actual)
    own_grid = vlmkit.image_processor.image_grid_pinpoints  # the checkpoint's pinpoints per call: the plain call
    assert_same_features(vlmkit(text=prompt, images=image, return_tensors="pt"),
                         vlmkit(text=prompt, images=image, image_grid_pinpoints=own_grid, return_tensors="pt"))


NON_SQUARE_SIZES = [{"height": 28, "width": 56}, {"height": 56, "width": 28}, {"height": 28, "width": 28}]


@pytest.mark.parametrize("size", NON_SQUARE_SIZES, ids=lambda size: f"{size['height']}x{size['width']}")
def test_other_sizes_per_call_match_reference_and_the_model_refuses_them(onevision_reference, onevision_vlmkit,
                                                                        size):
    """transformers cuts tiles size["height"] square, resizes every tower input to height x width and counts
    tokens with best pinpoint // (height, width); its model fails on such inputs, vlmkit's says why."""
    reference, vlmkit = onevision_reference[0], onevision_vlmkit[0]
    calls = [("<image> What?", pattern_image(300, 120, 2)), ("<image> What?", pattern_image(20, 300, 3)),
             ("<image><image> Compare.", [[pattern_image(37, 23), pattern_image(20, 70, 2)]])]
    for prompt, images in calls:
        expected = reference(text=prompt, images=images, size=size, return_tensors="pt")
        actual = vlmkit(text=prompt, images=images, size=size, return_tensors="pt")
        assert_same_features(expected, actual)
        assert tuple(actual["pixel_values"].shape[-2:]) == (size["height"], size["width"])
    with pytest.raises(InputError, match="vision tower takes 42x42"):
        onevision_vlmkit[1](**actual)


def test_a_size_in_the_preprocessor_config_matches_reference(llava_onevision_dir, tmp_path):
    import json
    import shutil

    from builders.llava_onevision import reference_processor

    from vlmkit import LlavaOnevisionProcessor

    folder = shutil.copytree(llava_onevision_dir, tmp_path / "wide")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"height": 28, "width": 56}
    (folder / "processor_config.json").write_text(json.dumps(config))
    image = pattern_image(300, 120, 2)
    expected = reference_processor(folder)(text="<image> What?", images=image, return_tensors="pt")
    assert_same_features(expected, LlavaOnevisionProcessor.from_pretrained(folder)(text="<image> What?", images=image))


def test_images_without_pixels_are_media_errors_naming_their_size(onevision_vlmkit):
    """transformers divides by zero on them."""
    for image, size in ((Image.new("RGB", (0, 0)), "0x0"), (np.zeros((0, 0, 3), np.uint8), "0x0"),
                        (np.zeros((5, 0, 3), np.uint8), "0x5")):
        with pytest.raises(MediaError, match=f"image is {size} pixels"):
            onevision_vlmkit[0](text="<image> What?", images=image)


def test_tiles_taller_than_the_picked_pinpoint_are_an_input_error(onevision_reference, onevision_vlmkit):
    image, size = pattern_image(37, 23), {"height": 56, "width": 28}  # picks the 42 x 42 pinpoint: no tile rows
    with pytest.raises(ZeroDivisionError):
        onevision_reference[0](text="<image> What?", images=image, size=size, return_tensors="pt")
    with pytest.raises(InputError, match="56 pixels high are taller than the grid pinpoint"):
        onevision_vlmkit[0](text="<image> What?", images=image, size=size)
