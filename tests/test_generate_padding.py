"""Padded batches in generate against transformers 5 on the tiny checkpoints (fp32): a right-padded batch
(positions restart at 0 for pads, so the answer of a padded row goes on from position 1) and padded ids
given without an attention mask (inferred from the pad token, unless it is also an end token) give the
same greedy tokens."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # tiny models: one thread (conftest.py)
              pytest.mark.filterwarnings("ignore:right-padding was detected")]

NEW_TOKENS = 6
PROMPTS = ["<|im_start|>user\nJust text here, no image at all. Some more words for length.<|im_end|>\n"
           "<|im_start|>assistant\n", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]


def _onevision_text(onevision_reference, padding_side: str) -> dict:
    ref_processor, _ = onevision_reference
    return dict(ref_processor(text=PROMPTS, padding=True, padding_side=padding_side, return_tensors="pt"))


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_right_padded_onevision_batch_matches_reference(onevision_reference, onevision_vlmkit, options):
    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    inputs = _onevision_text(onevision_reference, "right")
    assert not bool(inputs["attention_mask"][:, -1].all())  # a row ends with padding
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, **options)
    expected = ref_model.generate(**inputs, **options)
    assert model.generate(**inputs, **options).tolist() == expected.tolist()


def test_right_padded_janus_image_batch_matches_reference(janus_dir, sample_images):
    from janus_reference import chat_inputs, ours, reference

    (ref_processor, ref_model), (processor, model) = reference(str(janus_dir)), ours(str(janus_dir))
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}]
                     for image, question in [(sample_images["square"], "What do you see in this image, in detail?"),
                                             (sample_images["wide"], "Describe it.")]]
    ref_inputs = chat_inputs(ref_processor, conversations, padding=True, padding_side="right")
    inputs = chat_inputs(processor, conversations, padding=True, padding_side="right")
    assert torch.equal(ref_inputs["input_ids"], inputs["input_ids"])
    assert not bool(inputs["attention_mask"][:, -1].all())
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, generation_mode="text")
    expected = ref_model.generate(**ref_inputs, **options)
    assert model.generate(**inputs, **options).tolist() == expected.tolist()


def test_padded_ids_without_a_mask_match_reference(onevision_reference, onevision_vlmkit):
    """transformers infers the mask from the pad token (the checkpoint's, or one passed) when the ids hold
    it and it is not an end token; otherwise every position counts."""
    (_, ref_model), (_, model) = onevision_reference, onevision_vlmkit
    ids = _onevision_text(onevision_reference, "left")["input_ids"]
    pad = ref_model.generation_config.pad_token_id
    assert bool((ids == pad).any())
    other_pad = int(ids[0, 3])  # a prompt token taken as the pad: its places are masked out too
    for options in ({}, {"pad_token_id": other_pad}, {"eos_token_id": pad}, {"input_ids": ids.int()}):
        options = {"input_ids": ids, "max_new_tokens": NEW_TOKENS, "do_sample": False, **options}
        expected = ref_model.generate(**options)
        assert model.generate(**options).tolist() == expected.tolist(), options
