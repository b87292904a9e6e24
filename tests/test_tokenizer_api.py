"""The tokenizer surface transformers code calls (processor.tokenizer.tokenize, vocab_size, all_special_ids,
encode(..., return_tensors="pt"), apply_chat_template's transformers-5 defaults...) answers as transformers'
tokenizer does on the same checkpoint, for all three families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.io.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CALLS = {
    "vocab_size": lambda t: t.vocab_size,
    "len": lambda t: len(t),
    "get_vocab": lambda t: t.get_vocab(),
    "all_special_tokens": lambda t: sorted(t.all_special_tokens),
    "all_special_ids": lambda t: sorted(t.all_special_ids),
    "special_tokens_map": lambda t: t.special_tokens_map,
    "unk_token_id": lambda t: t.unk_token_id,
    "model_input_names": lambda t: list(t.model_input_names),
    "tokenize": lambda t: t.tokenize("Hello world, what is this?"),
    "convert_tokens_to_string": lambda t: t.convert_tokens_to_string(t.tokenize("Hello world, what is this?")),
    "encode": lambda t: t.encode("Hello world"),
    "encode_pt": lambda t: t.encode("Hello world", return_tensors="pt").tolist(),
    "encode_truncated": lambda t: t.encode("Hello world, what is this?", max_length=4, truncation=True),
    "decode_numpy": lambda t: t.decode(np.array([5, 6, 7])),
    "batch_decode_tensor": lambda t: t.batch_decode(torch.tensor([[5, 6], [7, 8]])),
    "added_token_ids": lambda t: sorted(t.added_tokens_decoder),
    "decode_batch": lambda t: t.decode(torch.tensor([[5, 6, 7], [8, 9, 10]])),
    "decode_cleaned": lambda t: t.decode(t.encode("Hello , world ."), clean_up_tokenization_spaces=True),
}


@pytest.fixture(params=["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def tokenizers(request):
    folder = request.getfixturevalue(request.param)
    return transformers.AutoTokenizer.from_pretrained(str(folder)), Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("call", list(CALLS))
def test_tokenizer_answers_as_transformers(tokenizers, call):
    reference, ours = tokenizers
    assert CALLS[call](ours) == CALLS[call](reference)


def test_apply_chat_template_tokenizes_by_default_as_transformers_5(tokenizers):
    reference, ours = tokenizers
    if reference.chat_template is None:
        pytest.skip("this checkpoint's tokenizer has no chat template")
    messages = [{"role": "user", "content": "What is in the picture?"}]
    want = reference.apply_chat_template(messages, add_generation_prompt=True)
    got = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert dict(got) == dict(want)
    assert ours.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
        reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ours.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def test_post_process_image_text_to_text_decodes_as_transformers(fixture, request):
    from vlmkit import AutoProcessor

    folder = request.getfixturevalue(fixture)
    if fixture == "llava_onevision_dir":  # transformers' PIL backend has no LLaVA-OneVision video processor
        from builders.llava_onevision import reference_processor
        reference = reference_processor(folder)
    else:
        reference = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
    ours = AutoProcessor.from_pretrained(folder)
    generated = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 11]])
    assert ours.post_process_image_text_to_text(generated) == reference.post_process_image_text_to_text(generated)
    assert ours.post_process_image_text_to_text(generated[0]) == reference.post_process_image_text_to_text(generated[0])


def test_special_tokens_are_set_as_in_transformers(tokenizers):
    """``tokenizer.pad_token = tokenizer.eos_token`` (and the id form) as fine-tuning code writes it: the pad
    token and padding follow; a token outside the vocabulary is an error."""
    from vlmkit.errors import InputError

    theirs, ours = tokenizers
    for tokenizer in (ours, theirs):
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    assert (ours.pad_token, ours.pad_token_id) == (theirs.pad_token, theirs.pad_token_id)
    batch = ["a b c d", "e"]
    assert ours(batch, padding=True)["input_ids"] == theirs(batch, padding=True)["input_ids"]
    ours.pad_token_id = theirs.bos_token_id
    assert ours.pad_token == theirs.bos_token and ours.is_fast
    ours.unk_token = ours.eos_token
    assert ours.unk_token_id == ours.eos_token_id
    with pytest.raises(InputError, match="not a token of this tokenizer's vocabulary"):
        ours.pad_token = "<surely-not-a-token>"
    ours.truncation_side = theirs.truncation_side = "left"
    assert ours("a b c d e f", truncation=True, max_length=3)["input_ids"] == \
        theirs("a b c d e f", truncation=True, max_length=3)["input_ids"]


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def test_auto_tokenizer_and_image_processor_load_what_transformers_autos_load(fixture, request, sample_images):
    import vlmkit

    folder = request.getfixturevalue(fixture)
    text = "What is in the picture?"
    assert vlmkit.AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    ours = vlmkit.AutoImageProcessor.from_pretrained(folder)(sample_images["wide"], return_tensors="pt")
    theirs = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")(sample_images["wide"],
                                                                                         return_tensors="pt")
    ours = ours if isinstance(ours, torch.Tensor) else ours["pixel_values"]  # IDEFICS' is the tensor itself
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_added_tokens_encode_save_and_load_as_in_transformers(tokenizers, tmp_path):
    """The fine-tuning recipe's first half (add tokens, then resize the model to len(tokenizer)): the same
    new ids, the same encoding, and a saved folder both libraries read back the same."""
    theirs, ours = tokenizers
    text = "a <obj> reallynewword b <spec>"
    for tokenizer in (theirs, ours):
        assert tokenizer.add_tokens(["<obj>", "reallynewword", "<obj>"]) == 2
        assert tokenizer.add_special_tokens({"additional_special_tokens": ["<spec>"]}) == 1
    assert len(ours) == len(theirs)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == \
        theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)
    ours.save_pretrained(tmp_path)
    for again in (transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_pretrained(tmp_path)):
        assert again(text)["input_ids"] == theirs(text)["input_ids"] and len(again) == len(theirs)


PAD_CALLS = {  # what data collators hand tokenizer.pad: examples encoded one by one, and their options
    "examples": (lambda t: [t("Hi"), t("Hello world, what is this?")], {}),
    "examples_pt": (lambda t: [t("Hi"), t("Hello world, what is this?")], dict(return_tensors="pt")),
    "max_length": (lambda t: [t("Hi"), t("Hello world")], dict(padding="max_length", max_length=12)),
    "max_length_shorter_than_a_row": (lambda t: [t("Hi"), t("Hello world, what is this?")],
                                      dict(padding="max_length", max_length=3)),
    "multiple_of_left": (lambda t: [t("Hi"), t("Hello world")], dict(pad_to_multiple_of=8, padding_side="left")),
    "batch_dict": (lambda t: t(["Hi", "Hello world, what is this?"]), dict(return_tensors="np")),
    "one_example": (lambda t: t("Hi"), dict(padding="max_length", max_length=6)),
    "labels_pass_through": (lambda t: [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                            {}),
    "no_mask": (lambda t: [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], dict(return_attention_mask=False)),
    "other_masks": (lambda t: {"input_ids": [[5, 6, 7], [8]], "token_type_ids": [[0, 0, 0], [0]],
                               "special_tokens_mask": [[0, 0, 0], [1]]}, dict(return_tensors="pt")),
    "tensors_in": (lambda t: {"input_ids": torch.tensor([[5, 6, 7]])}, dict(padding="max_length", max_length=5)),
    "arrays_in": (lambda t: {"input_ids": np.array([[5, 6, 7], [8, 9, 10]])}, {}),
    "tensor_examples": (lambda t: [{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}], {}),
    "not_padded": (lambda t: [t("Hi"), t("Hello world")], dict(padding=False)),
}


@pytest.mark.parametrize("case", PAD_CALLS)
def test_pad_pads_encoded_examples_as_transformers(tokenizers, case):
    reference, ours = tokenizers
    make, options = PAD_CALLS[case]
    if reference.pad_token is None:  # as fine-tuning code sets it
        reference.pad_token = ours.pad_token = reference.eos_token

    def padded(tokenizer):
        out = tokenizer.pad(make(tokenizer), **options)
        return {k: (type(v).__name__, v.tolist() if hasattr(v, "tolist") else v) for k, v in out.items()}

    assert padded(ours) == padded(reference)


def test_pad_without_a_pad_token_says_how_to_set_one(tokenizers):
    _, ours = tokenizers
    ours.pad_token = None
    from vlmkit.errors import InputError
    with pytest.raises(InputError, match="tokenizer.pad_token = tokenizer.eos_token"):
        ours.pad([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    assert ours.pad([{"input_ids": [5, 6]}, {"input_ids": [7, 8]}])["input_ids"] == [[5, 6], [7, 8]]


GENERATION_TEMPLATE = (  # a chat template marking the assistant's turns, as training templates do
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}")
CONVERSATION = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "A cat sat."},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No"}]


@pytest.mark.parametrize("options", [{}, {"return_tensors": "pt"}, {"return_tensors": "np", "padding": True},
                                     {"padding": True, "truncation": True, "max_length": 12}])
def test_assistant_tokens_mask_marks_what_transformers_marks(tokenizers, options):
    reference, ours = tokenizers
    if reference.pad_token is None:
        reference.pad_token = ours.pad_token = reference.eos_token
    for conversation in (CONVERSATION, [CONVERSATION, CONVERSATION[:2]]):
        call = dict(chat_template=GENERATION_TEMPLATE, return_assistant_tokens_mask=True, return_dict=True, **options)
        if conversation is not CONVERSATION:
            call.setdefault("padding", True)  # (transformers cannot make a tensor of rows of two lengths)
        want, got = reference.apply_chat_template(conversation, **call), ours.apply_chat_template(conversation, **call)
        assert type(got["assistant_masks"]) is type(want["assistant_masks"])
        as_list = (lambda x: x.tolist() if hasattr(x, "tolist") else x)
        assert as_list(got["assistant_masks"]) == as_list(want["assistant_masks"])
        assert as_list(got["input_ids"]) == as_list(want["input_ids"])
    if "max_length" not in options:  # (cut before the first answer)
        assert 0 < sum(sum(row) for row in as_list(got["assistant_masks"]))  # the last, a batch
