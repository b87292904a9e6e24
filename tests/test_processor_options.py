"""The options people pass to transformers' processors do what they do there: tokenizer options
(padding, truncation, max_length, pad_to_multiple_of, return_attention_mask...), per-call image options
(do_rescale, size, image_mean...), grouped ``text_kwargs``/``images_kwargs``, ``return_tensors``
"np"/None, ``continue_final_message`` and video frame sampling. Each case compares vlmkit's output with
transformers' (PIL backend) on the same tiny checkpoint, for all three families."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import InputError, MediaError

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

OV_PROMPT = "<|im_start|>user <image>\nWhat is shown here?<|im_end|>"
JANUS_PROMPT = "<image_placeholder>\nWhat is shown here?"


def as_plain(value):
    """Token rows, pixel arrays and sizes as nested lists, whatever container holds them."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.dtype != object else [as_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def assert_same(ours, reference, keys=None):
    keys = keys or sorted(reference.keys())
    assert sorted(ours.keys()) == sorted(reference.keys())
    for key in keys:
        got, want = as_plain(ours[key]), as_plain(reference[key])
        if key.startswith("pixel_values"):
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32),
                                          err_msg=key)
        else:
            assert got == want, key


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def onevision(llava_onevision_dir):
    from builders.llava_onevision import reference_processor

    from vlmkit.models.llava_onevision import LlavaOnevisionProcessor

    return reference_processor(llava_onevision_dir), LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir)


@pytest.fixture(scope="module")
def janus(janus_dir):
    from vlmkit.models.janus import JanusProcessor

    return transformers.AutoProcessor.from_pretrained(str(janus_dir), backend="pil"), JanusProcessor.from_pretrained(janus_dir)


@pytest.fixture(scope="module")
def idefics(idefics_resampler_dir):
    from vlmkit.models.idefics import IdeficsProcessor

    return (transformers.AutoProcessor.from_pretrained(str(idefics_resampler_dir), backend="pil"),
            IdeficsProcessor.from_pretrained(idefics_resampler_dir))


TEXTS = ["hello world foo bar baz", "hi", "one two three four five six seven eight nine ten"]
TOKENIZER_OPTIONS = [dict(zip(("padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side"), values))
                     for values in itertools.product([False, True, "max_length"], [None, False, True], [None, 3, 12],
                                                     [None, 4], ["left", "right"])]


@pytest.mark.parametrize("family", ["onevision", "janus", "idefics"])
def test_tokenizer_pads_and_truncates_as_transformers(family, request):
    reference, ours = (p.tokenizer for p in request.getfixturevalue(family))
    for options, return_tensors, special in itertools.product(TOKENIZER_OPTIONS, [None, "np", "pt"], [True, False]):
        for text in (TEXTS, TEXTS[2]):
            call = dict(options, return_tensors=return_tensors, add_special_tokens=special)
            try:
                want = reference(text, **call)
            except ValueError:  # e.g. rows of different lengths as one tensor: ours must refuse too
                with pytest.raises(InputError):
                    ours(text, **call)
                continue
            assert_same(ours(text, **call), want)


def test_tokenizer_truncates_on_its_configured_side(onevision):
    reference, ours = (p.tokenizer for p in onevision)
    reference.truncation_side = ours.config["truncation_side"] = "left"
    try:
        assert ours(TEXTS, max_length=4)["input_ids"] == reference(TEXTS, max_length=4)["input_ids"]
    finally:
        reference.truncation_side = "right"
        del ours.config["truncation_side"]


@pytest.mark.parametrize("options", [
    dict(padding="max_length", max_length=80), dict(truncation=True, max_length=80), dict(padding=True, pad_to_multiple_of=8),
    dict(text_kwargs={"padding": "max_length", "max_length": 80}), dict(return_attention_mask=False),
    dict(do_rescale=False), dict(do_normalize=False), dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.3, 0.3]),
    dict(images_kwargs={"do_rescale": False}), dict(common_kwargs={"return_tensors": "np"}),
    dict(return_tensors="np"), dict(return_tensors=None),
])
def test_onevision_processor_options_match_transformers(onevision, image, options):
    reference, ours = onevision
    call = {"return_tensors": "pt", **options}
    texts = [OV_PROMPT, OV_PROMPT.replace("What", "Which colours")]  # 1 token apart: pt needs padding
    if "padding" not in str(options):
        call["padding"] = True
    assert_same(ours(images=[image, image], text=texts, **call), reference(images=[image, image], text=texts, **call))


@pytest.mark.parametrize("options", [
    dict(truncation=True, max_length=150), dict(padding="max_length", max_length=160), dict(do_rescale=False),
    dict(do_pad=False), dict(image_mean=[0.1, 0.2, 0.3]), dict(size={"height": 48, "width": 48}),
    dict(min_size=20), dict(return_tensors="np"), dict(return_tensors=None), dict(resample=0),
])
def test_janus_processor_options_match_transformers(janus, image, options):
    reference, ours = janus
    call = {"return_tensors": "pt", **options}
    assert_same(ours(text=JANUS_PROMPT, images=image, **call), reference(text=JANUS_PROMPT, images=image, **call))


@pytest.mark.parametrize("options", [
    dict(truncation=True), dict(truncation=True, max_length=12), dict(padding="max_length", max_length=40),
    dict(do_rescale=False), dict(do_normalize=False), dict(text_kwargs={"max_length": 12}),
    dict(images_kwargs={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
])
def test_idefics_processor_options_match_transformers(idefics, image, options):
    reference, ours = idefics
    prompts = [["User: what is this?", image, "And this?", image], ["User:", image, "Say it."]]
    if options.get("truncation") is True and "max_length" not in options:
        # past the checkpoint's model_max_length (2048): truncation cuts the second image, which is dropped
        prompts[1].append("a picture of " * 1100)
    assert_same(ours(text=prompts, return_tensors="pt", **options), reference(text=prompts, return_tensors="pt", **options))


@pytest.mark.parametrize("family,call", [
    ("onevision", lambda p, image: p.image_processor(image, image_grid_pinpoints=[[42, 84], [84, 84]],
                                                     return_tensors="pt")),
    ("onevision", lambda p, image: p.image_processor([image], do_rescale=False, return_tensors="pt")),
    ("janus", lambda p, image: p.image_processor(image, size=48, return_tensors="pt")),
    ("janus", lambda p, image: p.image_processor(image, do_pad=False, return_tensors="np")),
])
def test_image_processor_takes_call_options(family, call, image, request):
    reference, ours = request.getfixturevalue(family)
    assert_same(call(ours, image), call(reference, image))


@pytest.mark.parametrize("options", [
    dict(do_normalize=False), dict(do_rescale=False), dict(image_mean=[0.1, 0.2, 0.3]), dict(image_std=0.25),
    dict(rescale_factor=100.0), dict(do_rescale=False, image_mean=0.2, return_tensors="np"),
    dict(input_data_format="channels_last", image_mean=[0.1, 0.2, 0.3], return_tensors="pt"),
])
def test_janus_postprocess_options_match_transformers(janus, options):
    reference, ours = janus
    shape = (2, 3, 8, 3) if "input_data_format" in options else (2, 3, 8, 8)  # 3 x 8 pictures, channels last
    images = list((torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.8).numpy())
    want = reference.postprocess(images, **options)["pixel_values"]
    for got in (ours.postprocess(images, **options), ours.image_processor.postprocess(images, **options)):
        assert [np.asarray(g).dtype for g in got["pixel_values"]] == [np.asarray(w).dtype for w in want]
        assert_same(got, {"pixel_values": want})


@pytest.mark.parametrize("return_tensors", ["pt", "np", None, "unset"])
def test_idefics_image_processor_returns_what_transformers_returns(idefics, image, return_tensors):
    # transformers' IdeficsImageProcessor returns the pixels themselves (no BatchFeature), in the asked type
    reference, ours = idefics
    options = {} if return_tensors == "unset" else {"return_tensors": return_tensors}
    for extra in ({}, {"do_normalize": False}, {"do_pad": False}):
        got, want = ours.image_processor([image, image], **options, **extra), \
            reference.image_processor([image, image], **options, **extra)
        assert type(got) is type(want)
        if isinstance(want, list):
            assert [type(w) for w in want] == [type(g) for g in got]
        np.testing.assert_array_equal(np.asarray(as_plain(got)), np.asarray(as_plain(want)))


@pytest.mark.parametrize("options", [dict(image_size=20), dict(images_kwargs={"image_size": 20}),
                                     dict(size={"shortest_edge": 20}), dict(size={"height": 20, "width": 28})])
def test_idefics_size_options_resize_as_transformers(idefics, options):
    # a call's image_size changes nothing in transformers 5.23 (only __init__ reads it); a shortest edge keeps
    # the aspect ratio; height and width need not be equal
    reference, ours = idefics
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(text=[["User:", picture, "What?"]], **options)
    assert_same(got, reference(text=[["User:", picture, "What?"]], **options))
    flat = {k: v for k, v in options.items() if k != "images_kwargs"} | options.get("images_kwargs", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours.image_processor([picture], return_tensors="pt", **flat)
    np.testing.assert_array_equal(got.numpy(), reference.image_processor([picture], return_tensors="pt", **flat).numpy())


@pytest.mark.parametrize("family", ["onevision", "janus"])
def test_continue_final_message_ends_the_prompt_inside_the_last_message(family, image, request):
    reference, ours = request.getfixturevalue(family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]
    rendered = ours.apply_chat_template(messages, continue_final_message=True)
    assert rendered == reference.apply_chat_template(messages, continue_final_message=True)
    assert rendered.endswith("The answer is")
    with pytest.raises(Exception, match="continue_final_message"):
        ours.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)


def test_chat_template_passes_processor_options_to_the_call(onevision, image):
    reference, ours = onevision
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": t}]}]
                for t in ("hi", "what is shown in this picture?")]
    call = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for options in (dict(padding="max_length", max_length=90), dict(processor_kwargs={"padding": True, "do_rescale": False})):
        assert_same(ours.apply_chat_template(messages, **call, **options),
                    reference.apply_chat_template(messages, **call, **options))


def test_video_frames_are_sampled_only_when_asked(onevision):
    from fixtures_llava import moving_pattern

    reference, ours = onevision
    video = np.stack([moving_pattern(i) for i in range(9)])
    prompt = "<|im_start|>user <video>\nWhat happens?<|im_end|>"
    for options in (dict(num_frames=3), dict(num_frames=3, do_sample_frames=True), dict(do_sample_frames=False)):
        got = ours(videos=video, text=prompt, return_tensors="pt", **options)
        want = reference(videos=video, text=prompt, return_tensors="pt", **options)
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["pixel_values_videos"].shape == want["pixel_values_videos"].shape
    assert ours(videos=video, text=prompt, num_frames=3)["pixel_values_videos"].shape[1] == 9  # kept, as transformers
    assert ours(videos=video, text=prompt, num_frames=3, do_sample_frames=True)["pixel_values_videos"].shape[1] == 3


def test_options_vlmkit_does_not_implement_are_errors_naming_them(onevision, janus, image):
    _, ours = onevision
    with pytest.raises(InputError, match="return_offsets_mapping"):
        ours(images=image, text=OV_PROMPT, return_offsets_mapping=True)
    with pytest.raises(InputError, match="do_center_crop"):
        janus[1](text=JANUS_PROMPT, images=image, do_center_crop=True)
    with pytest.raises(InputError, match="return_tensors='tf'"):
        ours(images=image, text=OV_PROMPT, return_tensors="tf")
    with pytest.warns(UserWarning, match="not_an_option"):
        ours(images=image, text=OV_PROMPT, not_an_option=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(images=image, text=OV_PROMPT, do_convert_rgb=True, device="cpu")  # neutral: accepted silently


@pytest.mark.parametrize("family,prompt", [("onevision", OV_PROMPT), ("janus", JANUS_PROMPT)])
def test_truncation_that_cuts_image_tokens_is_refused(family, prompt, image, request):
    reference, ours = request.getfixturevalue(family)
    if family == "onevision":  # transformers' Janus returns the cut prompt; the model then cannot place the image
        with pytest.raises(ValueError, match="truncation"):
            reference(text=prompt, images=image, truncation=True, max_length=9, return_tensors="pt")
    with pytest.raises(InputError, match="truncation cut"):
        ours(text=prompt, images=image, truncation=True, max_length=9)


def test_rows_of_different_lengths_as_a_tensor_name_the_fix(janus):
    _, ours = janus
    with pytest.raises(InputError, match="padding=True"):
        ours(text=["hi", "a much longer prompt than the first"], padding=False, return_tensors="pt")
    with pytest.raises(InputError, match="max_length"):
        ours.tokenizer(TEXTS, padding="max_length", max_length=3, truncation=False, return_tensors="pt")


def test_pil_images_keep_their_pixels_whatever_their_exif_orientation(onevision):
    # transformers turns decoded files upright (load_image), but a PIL image object, passed to images= or in a
    # chat message, keeps its pixels as they are: its EXIF orientation tag is not applied
    reference, ours = onevision
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    picture.getexif()[0x0112] = 6  # rotate 90 degrees clockwise to display
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "hi"}]}]
    call = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same(ours.apply_chat_template(messages, **call), reference.apply_chat_template(messages, **call))
    assert ours.apply_chat_template(messages, **call)["image_sizes"].tolist() == [[23, 37]]
    assert_same(ours(images=picture, text=OV_PROMPT), reference(images=picture, text=OV_PROMPT, return_tensors="pt"))


@pytest.mark.parametrize("family", ["onevision", "janus", "idefics"])
def test_float_images_with_do_rescale_false_match_transformers(family, request):
    # float pictures in [0, 1] (e.g. torchvision's ToTensor) are passed with do_rescale=False; a square one,
    # since transformers' Janus pads a float image with the 0..255 mean colour (127), far outside [0, 1]
    reference, ours = request.getfixturevalue(family)
    picture = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    for image in (picture, torch.from_numpy(picture).permute(2, 0, 1).contiguous()):
        if family == "idefics":
            got, want = ours(text=[["hi", image]], do_rescale=False), reference(text=[["hi", image]], do_rescale=False)
        else:
            prompt = OV_PROMPT if family == "onevision" else JANUS_PROMPT
            got = ours(text=prompt, images=image, do_rescale=False)
            want = reference(text=prompt, images=image, do_rescale=False, return_tensors="pt")
        assert_same(got, want)


@pytest.mark.parametrize("family", ["onevision", "janus", "idefics"])
def test_float_images_of_whole_numbers_up_to_255_match_transformers(family, request):
    # np.asarray(picture, dtype=np.float32): 0..255 in floats, rescaled as uint8 pixels would be
    reference, ours = request.getfixturevalue(family)
    picture = np.random.default_rng(0).integers(0, 256, (23, 37, 3)).astype(np.float32)
    for image in (picture, torch.from_numpy(picture).permute(2, 0, 1).contiguous()):
        if family == "idefics":
            got, want = ours(text=[["hi", image]]), reference(text=[["hi", image]])
        else:
            prompt = OV_PROMPT if family == "onevision" else JANUS_PROMPT
            got, want = ours(text=prompt, images=image), reference(text=prompt, images=image, return_tensors="pt")
        assert_same(got, want)
    with pytest.raises(MediaError, match=r"whole numbers in \[0, 255\]"):  # transformers cannot take these either
        ours(text=[["hi", picture + 0.5]]) if family == "idefics" else ours(text=JANUS_PROMPT, images=picture + 0.5)


def test_a_batch_array_of_images_is_its_images_as_in_transformers(janus):
    reference, ours = janus
    batch = np.random.default_rng(1).integers(0, 256, (2, 23, 37, 3), dtype=np.uint8)
    prompt = JANUS_PROMPT.replace("<image_placeholder>", "<image_placeholder><image_placeholder>")
    for images in (batch, torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()):
        assert_same(ours(text=prompt, images=images), reference(text=prompt, images=images, return_tensors="pt"))


def test_onevision_call_size_and_mean_count_tokens_and_pad_as_transformers(onevision):
    # a per-call tile size changes how many tokens each image takes; a per-call mean does not change the
    # colour multi-image prompts are padded with (fixed when the processor is made)
    reference, ours = onevision
    rng = np.random.default_rng(9)
    wide, tall = (Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((10, 40, 3), (30, 10, 3)))
    single = dict(text=OV_PROMPT, images=tall, size={"height": 14, "width": 14}, return_tensors="pt")
    assert_same(ours(**single), reference(**single))
    double = dict(text=OV_PROMPT.replace("<image>", "<image><image>"), images=[[wide, tall]],
                  image_mean=[0.1, 0.2, 0.3], return_tensors="pt")
    assert_same(ours(**double), reference(**double))


def test_images_of_different_sizes_without_resizing_are_refused_by_name(janus, idefics, image):
    other = image.resize((30, 20))
    with pytest.raises(InputError, match="different sizes"):
        janus[1](text=JANUS_PROMPT * 2, images=[image, other], do_resize=False)
    with pytest.raises(InputError, match="different sizes"):
        idefics[1](text=[["a", image, other]], do_resize=False)


def test_return_types_transformers_cannot_give_for_idefics(idefics, image):
    # transformers 5.23's IDEFICS processor raises here (KeyError 'attention_mask'; UnboundLocalError for None)
    _, ours = idefics
    prompts = [["User:", image, "What is it?"], ["User: hi"]]
    unmasked = ours(text=prompts, return_attention_mask=False)
    assert set(unmasked) == {"input_ids", "pixel_values", "image_attention_mask"}
    lists = ours(text=prompts, return_tensors=None)
    tensors = ours(text=prompts)
    assert lists["input_ids"] == tensors["input_ids"].tolist() and isinstance(lists["pixel_values"], list)
    np.testing.assert_array_equal(np.stack(lists["pixel_values"]), tensors["pixel_values"].numpy())


def test_ragged_rows_as_numpy_are_an_object_array_as_transformers(janus):
    reference, ours = janus
    call = dict(text=["hi", "hello there friend"], return_tensors="np")
    got, want = ours(**call)["input_ids"], reference(**call)["input_ids"]
    assert got.dtype == want.dtype == object and [r.tolist() for r in got] == [r.tolist() for r in want]


@pytest.mark.parametrize("text", [123, [None], [["nested"]], b"bytes", {"x": 1}])
def test_text_that_is_not_strings_is_refused_by_name(janus, onevision, text):
    for processor in (janus[1], onevision[1]):
        with pytest.raises(InputError, match="text must be a string or a list of strings"):
            processor(text=text)


def test_an_image_passed_where_text_goes_says_how_to_call(janus, image):
    with pytest.raises(InputError, match=r"processor\(text=prompt, images=image\)"):
        janus[1](image, JANUS_PROMPT)


@pytest.mark.parametrize("shape", [(0, 0, 3), (5, 0, 3), (0, 7, 3)])
def test_images_without_pixels_are_refused_by_size(janus, idefics, shape):
    empty = np.zeros(shape, np.uint8)
    with pytest.raises(MediaError, match="at least 1x1"):
        janus[1](text=JANUS_PROMPT, images=empty)
    with pytest.raises(MediaError, match="at least 1x1"):
        idefics[1](text=[["User:", empty]])
    with pytest.raises(MediaError, match="at least 1x1"):
        janus[1](text=JANUS_PROMPT, images=Image.new("RGB", shape[1::-1]))


def _chat_with_answers(image, placeholder: str):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'][0]['text'] }}<|im_end|>{% endgeneration %}{% else %}"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + placeholder + "{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>{% endif %}\n{% endfor %}")
    turns = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "And?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A dog here."}]}]
    return template, turns


@pytest.mark.parametrize("extra", [{}, {"padding": True}, {"return_tensors": "np"}])
def test_assistant_tokens_mask_of_a_chat_with_images_is_transformers(onevision, image, extra):
    """The mask behind the image tokens a prompt was expanded with still lands on the assistant's tokens."""
    reference, ours = onevision
    template, turns = _chat_with_answers(image, "<image>")
    conversation = [turns, turns[:2]] if extra.get("padding") else turns
    call = {**dict(tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
                   chat_template=template), **extra}
    want, got = reference.apply_chat_template(conversation, **call), ours.apply_chat_template(conversation, **call)
    assert type(got["assistant_masks"]) is type(want["assistant_masks"])
    assert got["assistant_masks"].tolist() == want["assistant_masks"].tolist()
    assert got["input_ids"].tolist() == want["input_ids"].tolist() and want["assistant_masks"].sum() > 0


def test_assistant_tokens_mask_of_janus_holds_the_answers(janus, image):
    # transformers' Janus processor refuses the option (its tokenizer does not count as fast there)
    _, ours = janus
    template, turns = _chat_with_answers(image, "<image_placeholder>")
    out = ours.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                   chat_template=template)
    assert out["input_ids"].shape == out["assistant_masks"].shape
    marked = out["input_ids"][out["assistant_masks"].bool()]
    assert ours.decode(marked) == "A cat.<|im_end|>A dog here.<|im_end|>"


def test_assistant_tokens_mask_where_vlmkit_does_not_give_it_says_so(idefics, image):
    _, ours = idefics
    with pytest.raises(InputError, match="return_assistant_tokens_mask"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
