"""Janus understanding against transformers on a tiny random checkpoint: processor outputs, fp32
logits and greedy generations, for one image, two images in one prompt and a padded batch."""

import pytest
import torch
from janus_reference import chat_inputs, ours, reference

NEW_TOKENS = 32


def one_image(image, question="What do you see in this image?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def two_images(first, second):
    return [{"role": "user", "content": [{"type": "text", "text": "What is the difference between"},
                                         {"type": "image", "image": first}, {"type": "text", "text": " and "},
                                         {"type": "image", "image": second}]}]


@pytest.mark.parametrize("name", ["square", "wide", "tall", "tiny", "gray", "rgba", "palette"])
def test_processor_matches_reference_for_every_image_shape_and_mode(janus_dir, sample_images, name):
    ref_processor, _ = reference(str(janus_dir))
    processor, _ = ours(str(janus_dir))
    image = sample_images[name]
    # transformers 5.23's Janus processor raises on L/RGBA/P input; vlmkit converts to RGB as users
    # expect, so the reference is fed the image vlmkit converted (transformers' convert_to_rgb rules).
    from vlmkit.io.media import load_image
    expected = chat_inputs(ref_processor, one_image(load_image(image)))
    got = chat_inputs(processor, one_image(image))
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)


def _cases(images):
    return {
        "single image": one_image(images["square"]),
        "two images in one prompt": two_images(images["wide"], images["tall"]),
        "padded batch": [two_images(images["square"], images["wide"]),
                         one_image(images["tall"], "Describe it.")],
    }


@pytest.mark.parametrize("case", ["single image", "two images in one prompt", "padded batch"])
def test_logits_and_greedy_generation_match_reference(janus_dir, sample_images, case):
    ref_processor, ref_model = reference(str(janus_dir))
    processor, model = ours(str(janus_dir))
    messages = _cases(sample_images)[case]
    options = {"padding": True} if case == "padded batch" else {}
    expected_inputs = chat_inputs(ref_processor, messages, **options)
    inputs = chat_inputs(processor, messages, **options)
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], expected_inputs["attention_mask"])
    with torch.no_grad():
        expected_logits = ref_model(**expected_inputs).logits
        logits = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits[real], expected_logits[real], atol=1e-4, rtol=0)
    expected = ref_model.generate(**expected_inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  generation_mode="text")
    got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, generation_mode="text")
    assert got.tolist() == expected.tolist()
    assert processor.batch_decode(got, skip_special_tokens=True) == \
        ref_processor.batch_decode(expected, skip_special_tokens=True)


def test_padded_rows_generate_what_they_generate_alone(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    batch = _cases(sample_images)["padded batch"]
    batched = model.generate(**chat_inputs(processor, batch, padding=True), max_new_tokens=12)
    for row, messages in enumerate(batch):
        alone = model.generate(**chat_inputs(processor, messages), max_new_tokens=12)
        assert batched[row, -12:].tolist() == alone[0, -12:].tolist()


def test_seed_example_shapes_dtype_cast_and_decode(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, one_image(sample_images["square"])).to(model.device, dtype=torch.bfloat16)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert inputs["input_ids"].dtype == torch.long  # .to(dtype=...) casts floating tensors only
    output = model.generate(**inputs.to(dtype=torch.float32), max_new_tokens=5, do_sample=True, seed=0,
                            generation_mode="text")
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5
    text = processor.decode(output[0], skip_special_tokens=True)
    assert "<image_placeholder>" not in text and text.startswith("You are a helpful")


def test_bfloat16_model_agrees_with_float32_on_the_first_greedy_tokens(janus_dir, sample_images):
    from vlmkit import JanusForConditionalGeneration
    processor, model = ours(str(janus_dir))
    half = JanusForConditionalGeneration.from_pretrained(str(janus_dir), dtype=torch.bfloat16, device_map="cpu")
    assert half.dtype == torch.bfloat16
    inputs = chat_inputs(processor, one_image(sample_images["square"]))
    with torch.no_grad():
        full_logits = model(**inputs).logits[0, -1]
        half_logits = half(**inputs.to(dtype=torch.bfloat16)).logits[0, -1].float()
    assert torch.nn.functional.cosine_similarity(full_logits, half_logits, dim=0) > 0.99


def test_sampling_is_reproducible_with_a_seed_and_varies_without(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, one_image(sample_images["square"]))
    first = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    again = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    other = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.5, seed=8)
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()
    several = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=1,
                             num_return_sequences=3)
    assert several.shape[0] == 3 and len({tuple(r) for r in several.tolist()}) > 1


def test_labels_give_the_reference_loss(janus_dir, sample_images):
    ref_processor, ref_model = reference(str(janus_dir))
    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, one_image(sample_images["square"]))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        expected = ref_model(**chat_inputs(ref_processor, one_image(sample_images["square"])), labels=labels).loss
        got = model(**inputs, labels=labels).loss
    assert torch.allclose(got, expected, atol=1e-5)


def test_streamer_receives_the_same_text_as_the_final_decode(janus_dir, sample_images):
    from vlmkit import TextStreamer
    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, one_image(sample_images["wide"]))
    chunks = []
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, on_text=chunks.append, skip_special_tokens=True)
    output = model.generate(**inputs, max_new_tokens=20, streamer=streamer)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert "".join(chunks) == processor.decode(new_tokens, skip_special_tokens=True)
    assert len(chunks) > 1


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_vlmkits_streamers_take_transformers_arguments_and_stream_what_transformers_streamers_do(
        janus_dir, sample_images, capsys, skip_prompt):
    """The same call with transformers' TextStreamer and TextIteratorStreamer, then vlmkit's: the same text
    printed (the prompt too by default, special tokens kept unless skipped) and iterated."""
    import threading

    import transformers

    import vlmkit

    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, one_image(sample_images["wide"]))
    printed = {}
    for library in (transformers, vlmkit):
        model.generate(**inputs, max_new_tokens=12, streamer=library.TextStreamer(processor.tokenizer, skip_prompt))
        printed[library.__name__] = capsys.readouterr().out
    assert printed["vlmkit"] == printed["transformers"] and printed["vlmkit"].endswith("\n")
    iterated = {}
    for library in (transformers, vlmkit):
        streamer = library.TextIteratorStreamer(processor.tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True,
                                                timeout=60)
        thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=12, streamer=streamer))
        thread.start()
        iterated[library.__name__] = "".join(streamer)
        thread.join()
    assert iterated["vlmkit"] == iterated["transformers"] and iterated["vlmkit"]
