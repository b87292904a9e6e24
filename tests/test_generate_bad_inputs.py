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


def _tiny_prompt(length: int = 8) -> torch.Tensor:
    return torch.randint(0, 500, (1, length), generator=torch.Generator().manual_seed(0))


def test_a_max_length_the_prompt_fills_is_refused_as_transformers_does(onevision_reference, onevision_vlmkit):
    """transformers refuses a max_length that leaves nothing to generate; vlmkit used to hand the prompt back."""
    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    ids = _tiny_prompt(30)
    for max_length in (10, 30):
        refused = f"Input length of input_ids is 30, but `max_length` is set to {max_length}"
        with pytest.raises(ValueError, match=refused):
            ref_model.generate(input_ids=ids, max_length=max_length)
        with pytest.raises(InputError, match=f"input_ids is 30, but max_length is set to {max_length}.*max_new_tokens"):
            model.generate(input_ids=ids, max_length=max_length)
    assert model.generate(input_ids=ids, max_length=31).tolist() == ref_model.generate(input_ids=ids,
                                                                                        max_length=31).tolist()


# options transformers' generate fails on (a raw TypeError, IndexError or ValueError), with what vlmkit's error names
REFUSED_OPTIONS = [
    (dict(max_new_tokens="4"), "max_new_tokens must be a number"),
    (dict(num_beams=2.0), "num_beams must be a whole number"),
    (dict(num_return_sequences=2.0, do_sample=True), "num_return_sequences must be a whole number"),
    (dict(do_sample=True, temperature="0.7"), "temperature must be a number"),
    (dict(do_sample=True, top_p="0.5"), "top_p must be a number"),
    (dict(repetition_penalty="1.2"), "repetition_penalty must be a number"),
    (dict(eos_token_id="x"), "eos_token_id must be a token id"),
    (dict(eos_token_id=[3, "x"]), "eos_token_id must be a token id"),
    (dict(pad_token_id="x"), "pad_token_id must be a token id"),
    (dict(forced_eos_token_id=10 ** 6), "forced_eos_token_id .* vocabulary of 640 tokens"),
    (dict(forced_eos_token_id=[10 ** 6]), "forced_eos_token_id .* vocabulary of 640 tokens"),
    (dict(forced_eos_token_id=-5), "forced_eos_token_id .* vocabulary of 640 tokens"),
    (dict(do_sample=True, top_k=-3), "top_k must be a whole number > 0 when sampling"),
    (dict(do_sample=True, top_k=2.0), "top_k must be a whole number > 0 when sampling"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "the prompt is empty"),
]


def test_options_of_the_wrong_type_are_errors_naming_them(onevision_reference, onevision_vlmkit):
    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    assert model.token_id_count == 640
    for options, named in REFUSED_OPTIONS:
        options = {"input_ids": _tiny_prompt(), "max_new_tokens": 4, **options}
        with pytest.raises((TypeError, ValueError, IndexError, RuntimeError)):
            ref_model.generate(**options)
        with pytest.raises(InputError, match=named):
            model.generate(**options)


def test_options_transformers_takes_give_its_tokens(onevision_reference, onevision_vlmkit):
    """A fractional length (the answer stops at the next whole length), numpy numbers, token ids as whole floats
    or integer tensors, and top_k < 0 without sampling (not read then) are taken, as transformers takes them."""
    import numpy as np

    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    ids = _tiny_prompt()
    first = ref_model.generate(input_ids=ids, max_new_tokens=2)[0, -1].item()
    for options in (dict(max_new_tokens=2.5), dict(max_new_tokens=np.float32(2.5)), dict(max_length=9.5),
                    dict(max_new_tokens=np.int64(3)), dict(max_new_tokens=True), dict(num_beams=np.int64(2)),
                    dict(eos_token_id=float(first)), dict(eos_token_id=torch.tensor([first, 5])),
                    dict(eos_token_id=torch.tensor(first)), dict(forced_eos_token_id=np.int64(5)),
                    dict(top_k=-3), dict(max_new_tokens=4, max_length="x")):
        options = {"input_ids": ids, "do_sample": False, **options}
        if "max_length" not in options:
            options.setdefault("max_new_tokens", 4)
        assert model.generate(**options).tolist() == ref_model.generate(**options).tolist(), options


REFUSED_WHEN_SAMPLING = [dict(top_p=-0.5), dict(typical_p=0.0), dict(min_p=2.0), dict(top_h=2.0)]
OFF_WHEN_SAMPLING = [dict(top_p=5.0), dict(typical_p=2.0), dict(epsilon_cutoff=1.5), dict(eta_cutoff=-1.0)]


@pytest.mark.parametrize("options", REFUSED_WHEN_SAMPLING + OFF_WHEN_SAMPLING, ids=str)
def test_sampling_filters_are_checked_where_transformers_builds_them(onevision_reference, onevision_vlmkit, options):
    """transformers builds its sampling filters only when sampling, and top_p / typical_p only below 1,
    epsilon and eta cutoffs only inside (0, 1): greedy decoding takes any value (its greedy tokens), and
    sampling refuses what a filter it builds refuses and samples without the others."""
    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    call = {"input_ids": _tiny_prompt(), "max_new_tokens": 4, **options}
    assert model.generate(**call, do_sample=False).tolist() == ref_model.generate(**call, do_sample=False).tolist()
    if options in OFF_WHEN_SAMPLING:
        ref_model.generate(**call, do_sample=True)
        assert model.generate(**call, do_sample=True).shape[1] > call["input_ids"].shape[1]
        return
    with pytest.raises(ValueError):
        ref_model.generate(**call, do_sample=True)
    with pytest.raises(InputError, match=next(iter(options))):
        model.generate(**call, do_sample=True)
