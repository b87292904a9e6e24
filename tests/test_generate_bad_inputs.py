"""What users hand generate and the tokenizer by mistake (an unbatched prompt, float ids, ids of another
vocabulary, a mask of another length, NaN options, text with lone surrogates) is an error naming it, in
every family, before any decoding (torch's own errors come from deep inside the forward)."""

import pytest
import torch
from quantization_support import FIXTURES, vlmkit_class

from vlmkit import AutoProcessor, InputError


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def family(request):
    folder = request.getfixturevalue(FIXTURES[request.param])
    return request.param, vlmkit_class(request.param).from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_prompts_the_model_cannot_read_are_errors_naming_them(family):
    _, model, processor = family
    prompt = processor.tokenizer("hello there", return_tensors="pt")
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    for inputs, named in ((dict(input_ids=ids[0]), r"\[batch, length\]"), (dict(input_ids=ids.float()), "integer"),
                          (dict(input_ids=ids + model.token_id_count), "vocabulary"),
                          (dict(input_ids=ids, attention_mask=mask[:, :1]), "attention_mask")):
        with pytest.raises(InputError, match=named):
            model.generate(**inputs, max_new_tokens=2)
    assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2).shape == (1, ids.shape[1] + 2)


@pytest.mark.parametrize("option", ["temperature", "top_p", "repetition_penalty", "min_p"])
def test_nan_or_infinite_options_are_refused_by_name(family, option):
    _, model, processor = family
    ids = processor.tokenizer("hello there", return_tensors="pt")["input_ids"]
    for value in (float("nan"), float("inf")):
        with pytest.raises(InputError, match=f"{option} must be a finite number"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=True, **{option: value})


def test_janus_image_prompts_padded_on_the_right_say_to_pad_on_the_left(janus_dir):
    model, processor = vlmkit_class("janus").from_pretrained(janus_dir), AutoProcessor.from_pretrained(janus_dir)
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=["a cat", "a very large dog on a hill"], generation_mode="image", padding=True)
    with pytest.raises(InputError, match="padded on the left"):
        model.generate(**inputs, generation_mode="image")
    with pytest.raises(InputError, match="guidance_scale must be a finite number"):
        model.generate(**processor(text="a cat", generation_mode="image"), generation_mode="image",
                       guidance_scale=float("nan"))


def test_the_tokenizer_refuses_lone_surrogates_and_negative_ids(family):
    tokenizer = family[2].tokenizer
    with pytest.raises(InputError, match="unpaired surrogate"):
        tokenizer("broken \ud800 text")
    with pytest.raises(InputError, match="whole numbers from 0"):
        tokenizer.decode([5, -1])


def test_a_checkpoint_max_length_past_the_context_ends_the_answer_at_the_context(llava_onevision_dir, tmp_path):
    """generation_config.json may set max_length past the model's context (a cap, not a request): generate
    without a length option answers up to the context instead of refusing a length nobody asked for."""
    import json
    import shutil

    from vlmkit import AutoModelForImageTextToText

    folder = shutil.copytree(llava_onevision_dir, tmp_path / "long")
    path = folder / "generation_config.json"
    values = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**values, "max_length": 10 ** 6, "eos_token_id": None}))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    prompt = torch.tensor([[3, 4, 5]])
    assert model.generate(prompt).shape == (1, model.max_context)
    with pytest.raises(InputError, match="max_new_tokens"):  # asked for in so many words: still an error
        model.generate(prompt, max_new_tokens=model.max_context)
