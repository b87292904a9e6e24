"""IDEFICS against transformers on two tiny random checkpoints (with and without the perceiver
resampler): processor outputs, fp32 logits, greedy generations, loss, freezing, and bad inputs."""

import copy
import functools
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from builders.idefics import IDEFICS_CHAT_TEMPLATE, IDEFICS_FAKE_TOKEN, IDEFICS_IMAGE_TOKEN
from vlmkit.errors import InputError, MediaError
from vlmkit.models.idefics import IdeficsForVisionText2Text, IdeficsProcessor

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

NEW_TOKENS = 24
VARIANTS = ["resampler", "plain"]
PROMPTS = ["text only", "one image", "three interleaved images", "padded batch"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture
def checkpoint(variant, request) -> str:
    return str(request.getfixturevalue(f"idefics_{variant}_dir"))


@functools.lru_cache(maxsize=4)
def reference(path: str):
    """(transformers processor with the PIL backend, transformers model in fp32)."""
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = transformers.IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32).eval()
    return processor, model


@functools.lru_cache(maxsize=4)
def ours(path: str):
    return IdeficsProcessor.from_pretrained(path), IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32)


def prompts(images, case):
    """Prompts as users write them. "User:" comes before any image: those tokens must see no image."""
    cases = {
        "text only": ["Describe the image in detail."],
        "one image": ["User:", images["square"], "What is in the image?\nAssistant:"],
        "three interleaved images": ["User:", images["wide"], "Describe this image.", images["tall"], images["gray"],
                                     "Which image is brighter?\nAssistant:"],
    }
    if case == "padded batch":
        return [cases["three interleaved images"], cases["one image"], cases["text only"]]
    return cases[case]


def assert_same_features(got, expected):
    assert set(got) == set(expected) == {"input_ids", "attention_mask", "pixel_values", "image_attention_mask"}
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


# --- processor -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PROMPTS)
@pytest.mark.parametrize("options", [{}, {"add_end_of_utterance_token": False}, {"add_end_of_utterance_token": True},
                                     {"add_eos_token": True}, {"padding_side": "right"},
                                     {"truncation": True, "max_length": 12}, {"padding": "max_length", "max_length": 40}],
                         ids=str)
def test_processor_matches_reference(idefics_resampler_dir, sample_images, case, options):
    ref_processor, _ = reference(str(idefics_resampler_dir))
    processor, _ = ours(str(idefics_resampler_dir))
    text = prompts(sample_images, case)
    assert_same_features(processor(text=text, **options), ref_processor(text=text, **options))


def test_processor_takes_the_prompts_positionally_as_the_model_card_does(idefics_plain_dir, sample_images):
    # transformers 5.23's __call__(images, text) leaves `processor(prompts)` unbound (UnboundLocalError)
    ref_processor, _ = reference(str(idefics_plain_dir))
    processor, _ = ours(str(idefics_plain_dir))
    text = prompts(sample_images, "padded batch")
    assert_same_features(processor(text, return_tensors="pt"), ref_processor(text=text))


def test_processor_images_and_text_arguments_pair_as_the_reference(idefics_plain_dir, sample_images):
    ref_processor, _ = reference(str(idefics_plain_dir))
    processor, _ = ours(str(idefics_plain_dir))
    square, wide, tall = sample_images["square"], sample_images["wide"], sample_images["tall"]
    for images in ([[square, wide], [tall]], [square, tall]):
        texts = ["What is in the image?", "Describe it."]
        assert_same_features(processor(images=images, text=texts), ref_processor(images=images, text=texts))


def test_processor_takes_numpy_and_torch_images(idefics_plain_dir, sample_images):
    ref_processor, _ = reference(str(idefics_plain_dir))
    processor, _ = ours(str(idefics_plain_dir))
    array = np.array(sample_images["wide"])
    text = ["User:", array, "and", torch.from_numpy(array).permute(2, 0, 1), "Which is brighter?"]
    assert_same_features(processor(text=text), ref_processor(text=text))


def test_end_of_utterance_default_tokenises_as_the_reference(idefics_resampler_dir, sample_images):
    # The documented default (None: on when the tokenizer has the token) is off in transformers 5.23,
    # which looks for the token where v5 tokenizers no longer list it; vlmkit tokenises as the reference.
    ref_processor, _ = reference(str(idefics_resampler_dir))
    processor, _ = ours(str(idefics_resampler_dir))
    text = ["User: hi", "What is in the image?", sample_images["square"], "Assistant:"]
    assert_same_features(processor(text=text), ref_processor(text=text))
    assert_same_features(processor(text=text, add_end_of_utterance_token=True),
                         ref_processor(text=text, add_end_of_utterance_token=True))


def test_image_attention_mask_lets_tokens_see_the_latest_image_only(idefics_plain_dir, sample_images):
    processor, _ = ours(str(idefics_plain_dir))
    features = processor(text=prompts(sample_images, "three interleaved images"))
    ids, mask = features["input_ids"][0], features["image_attention_mask"][0]
    image_id = processor.tokenizer.token_id(IDEFICS_IMAGE_TOKEN)
    positions = (ids == image_id).nonzero().flatten().tolist()
    assert len(positions) == 3 and mask.shape == (len(ids), 3)
    assert not mask[:positions[0]].any()  # "User:" and the fake token before the first image
    for index, (start, end) in enumerate(zip(positions, positions[1:] + [len(ids)])):
        assert mask[start:end, index].all() and mask[start:end].sum() == end - start


# --- model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PROMPTS)
def test_logits_and_greedy_generation_match_reference(checkpoint, sample_images, case):
    ref_processor, ref_model = reference(checkpoint)
    processor, model = ours(checkpoint)
    inputs = processor(text=prompts(sample_images, case))
    expected_inputs = ref_processor(text=prompts(sample_images, case))
    with torch.no_grad():
        expected = ref_model(**expected_inputs).logits
        logits = model(**inputs).logits
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)

    prompt_length = inputs["input_ids"].shape[1]
    limits = [{"max_new_tokens": NEW_TOKENS}]
    if case == "padded batch":  # every prompt is in it: max_length is checked once, on the batch
        limits.append({"max_length": prompt_length + 16})
    for limit in limits:
        expected_ids = ref_model.generate(**expected_inputs, do_sample=False, **limit)
        got = model.generate(**inputs, do_sample=False, **limit)
        assert got.tolist() == expected_ids.tolist(), limit
        assert processor.batch_decode(got, skip_special_tokens=True) == \
            ref_processor.batch_decode(expected_ids, skip_special_tokens=True)
    assert len(set(got[:, prompt_length:].flatten().tolist())) > 3  # a real continuation, not one token


def test_images_change_only_positions_that_may_see_them(checkpoint, sample_images):
    ref_processor, ref_model = reference(checkpoint)
    processor, model = ours(checkpoint)
    inputs = processor(text=prompts(sample_images, "one image"))
    other = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))
    with torch.no_grad():
        change = (model(**inputs).logits - model(**other).logits).abs().amax(-1)[0]
        expected_change = (ref_model(**inputs).logits - ref_model(**other).logits).abs().amax(-1)[0]
    first_image = int(inputs["image_attention_mask"][0, :, 0].nonzero()[0])
    assert torch.allclose(change, expected_change, atol=1e-4)
    assert change[:first_image].max() == 0  # the cross-attention gate zeroes text before any image
    assert change[first_image:].min() > 1e-3  # and the gates are open: the image matters after it


def test_precomputed_image_features_give_the_same_logits(checkpoint, sample_images, variant):
    _, ref_model = reference(checkpoint)
    processor, model = ours(checkpoint)
    inputs = processor(text=prompts(sample_images, "padded batch"))
    with torch.no_grad():
        features = ref_model(**inputs).image_hidden_states
        name = "perceiver_embeddings" if variant == "resampler" else "image_encoder_embeddings"
        expected = ref_model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, **{name: features}).logits
        out = model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, **{name: features})
    assert torch.allclose(out.logits, expected, atol=1e-4, rtol=0)
    assert torch.allclose(model(**inputs).image_hidden_states, features, atol=1e-5, rtol=0)


def test_larger_images_with_interpolated_positions_match_reference(checkpoint, sample_images):
    _, ref_model = reference(checkpoint)
    processor, model = ours(checkpoint)
    inputs = processor(text=prompts(sample_images, "one image"))
    inputs["pixel_values"] = torch.randn(1, 1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref_model(**inputs, interpolate_pos_encoding=True).logits
        logits = model(**inputs, interpolate_pos_encoding=True).logits
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        model(**inputs)


def test_text_only_prompt_needs_no_pixel_values(checkpoint, sample_images):
    # vlmkit accepts text without images (the reference insists on a blank image no token may see)
    ref_processor, ref_model = reference(checkpoint)
    _, model = ours(checkpoint)
    inputs = ref_processor(text=prompts(sample_images, "text only"))
    expected = ref_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    got = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12)
    assert got.tolist() == expected.tolist()


def test_return_sequences_reuse_the_image_keys_values_per_row(idefics_resampler_dir, sample_images):
    processor, model = ours(str(idefics_resampler_dir))
    inputs = processor(text=prompts(sample_images, "padded batch"))
    single = model.generate(**inputs, max_new_tokens=10)
    repeated = model.generate(**inputs, max_new_tokens=10, num_return_sequences=2)
    assert repeated.tolist() == single.repeat_interleave(2, dim=0).tolist()


def test_loss_matches_reference(checkpoint, sample_images, variant):
    ref_processor, ref_model = reference(checkpoint)
    processor, model = ours(checkpoint)
    inputs = processor(text=prompts(sample_images, "padded batch"))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        if variant == "plain":
            expected = ref_model(**inputs, labels=labels).loss
        else:
            # transformers' loss reshapes the logits to config.vocab_size columns, which fails with an
            # additional vocabulary; the loss it means is the cross-entropy over all columns
            logits = ref_model(**inputs).logits
            expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-5, rtol=0)


def _requires_grad(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_freeze_flags_set_requires_grad_as_the_reference(checkpoint):
    # compared with the model transformers builds from the config: its from_pretrained loses the
    # freezing (every loaded parameter comes back trainable); vlmkit keeps what the config asks for
    config = transformers.IdeficsConfig.from_pretrained(checkpoint)
    expected = _requires_grad(transformers.IdeficsForVisionText2Text(config))
    _, model = ours(checkpoint)
    got = _requires_grad(model)
    assert got == expected
    assert 0 < sum(got.values()) < len(got)

    # explicit freezing with exceptions, on fresh copies of both
    _, ref_model = reference(checkpoint)
    fresh = IdeficsForVisionText2Text.from_pretrained(checkpoint)
    for m in (ref_model.model, fresh.model):
        m.freeze_text_layers(["Linear"])
        m.freeze_vision_layers(["LayerNorm", "Embedding"])
    touched = ("model.layers.", "model.norm.", "model.vision_model.")
    got, expected = _requires_grad(fresh), _requires_grad(ref_model)
    assert {n: g for n, g in got.items() if n.startswith(touched)} == \
        {n: e for n, e in expected.items() if n.startswith(touched)}
    ref_model.requires_grad_(True)


# --- chat template ---------------------------------------------------------------------------------

def test_chat_template_is_kept_and_places_images_where_the_user_put_them(idefics_plain_dir, sample_images):
    # transformers' IdeficsProcessor drops the saved chat template; vlmkit keeps and uses it
    ref_processor, ref_model = reference(str(idefics_plain_dir))
    processor, model = ours(str(idefics_plain_dir))
    assert processor.chat_template == IDEFICS_CHAT_TEMPLATE
    image = sample_images["square"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in"}, {"type": "image", "image": image},
                                             {"type": "text", "text": "this image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "User: What is in<image> this image?<end_of_utterance>\nAssistant:"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    image_block = IDEFICS_FAKE_TOKEN + IDEFICS_IMAGE_TOKEN + IDEFICS_FAKE_TOKEN
    expected_text = "<s>User: What is in" + image_block + " this image?<end_of_utterance>\nAssistant:"
    expected_ids = ref_processor.tokenizer([expected_text], add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"].tolist() == expected_ids
    assert torch.equal(inputs["pixel_values"], ref_processor(text=["x", image])["pixel_values"])
    expected = ref_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert model.generate(**inputs, max_new_tokens=12).tolist() == expected.tolist()


def test_default_chat_template_writes_the_instruct_model_card_prompt(idefics_resampler_dir, sample_images):
    # idefics-9b(-instruct) save no chat template; vlmkit's default reproduces the model card's format
    ref_processor, _ = reference(str(idefics_resampler_dir))
    processor, _ = ours(str(idefics_resampler_dir))
    tokenizer = copy.copy(processor.tokenizer)
    tokenizer.chat_template = None
    processor = IdeficsProcessor(processor.image_processor, tokenizer)
    first, second = sample_images["wide"], sample_images["tall"]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image", "image": first}]},
        {"role": "assistant", "content": "This picture depicts a dog running on the ground."},
        {"role": "user", "content": [{"type": "image", "image": second}, {"type": "text", "text": "And who is that?"}]},
    ]
    card = ["User: What is in this image?", first, "<end_of_utterance>",
            "\nAssistant: This picture depicts a dog running on the ground.<end_of_utterance>",
            "\nUser:", second, "And who is that?<end_of_utterance>", "\nAssistant:"]
    got = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_same_features(got, ref_processor(text=card, add_end_of_utterance_token=False))


# --- bad inputs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_server(sample_images):
    png = io.BytesIO()
    sample_images["square"].save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/square.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png.getvalue())))
                self.end_headers()
                self.wfile.write(png.getvalue())
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_image_urls_are_fetched_like_images(idefics_plain_dir, sample_images, image_server):
    processor, _ = ours(str(idefics_plain_dir))
    from_url = processor(text=["User:", f" {image_server}/square.png ", "What is in the image?"])
    from_image = processor(text=["User:", sample_images["square"], "What is in the image?"])
    assert_same_features(from_url, from_image)


def test_failing_url_is_a_media_error(idefics_plain_dir, image_server):
    processor, _ = ours(str(idefics_plain_dir))
    with pytest.raises(MediaError, match="404"):
        processor(text=["User:", f"{image_server}/missing.png", "What is in the image?"])


@pytest.mark.parametrize("item", [42, None, {"url": "x.png"}, b"not an image"], ids=repr)
def test_item_that_is_neither_text_image_nor_url_is_an_input_error(idefics_plain_dir, item):
    processor, _ = ours(str(idefics_plain_dir))
    with pytest.raises(InputError, match="item 1 of prompt 0"):
        processor(text=["User:", item, "What is in the image?"])


@pytest.mark.parametrize("text", [[], [[]], [["hi"], []], None], ids=repr)
def test_empty_prompts_are_input_errors(idefics_plain_dir, text):
    processor, _ = ours(str(idefics_plain_dir))
    with pytest.raises(InputError, match="prompt"):
        processor(text=text)


def test_images_without_their_attention_mask_are_an_input_error(idefics_plain_dir, sample_images):
    processor, model = ours(str(idefics_plain_dir))
    inputs = processor(text=prompts(sample_images, "one image"))
    with pytest.raises(InputError, match="image_attention_mask"):
        model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=2)
    with pytest.raises(InputError, match="image_attention_mask"):
        model(**dict(inputs, image_attention_mask=inputs["image_attention_mask"][:, :-1]))


def test_requests_with_different_image_counts_decode_together_as_they_do_alone(idefics_plain_dir, sample_images):
    """What the server's step-level batching relies on: caches of separate requests (two images, one,
    none) joined into one batch give each row the logits it gets alone."""
    from vlmkit.generation.loop import prompt_positions
    from vlmkit.serve.batching import merge_caches

    processor, model = ours(str(idefics_plain_dir))
    requests = [["User:", sample_images["square"], "and", sample_images["wide"], "Compare.\nAssistant:"],
                ["User:", sample_images["tall"], "What is it?\nAssistant:"],
                ["User: say something long enough to be the longest prompt here.\nAssistant:"]]
    caches, tokens, positions, solo_logits = [], [], [], []
    with torch.no_grad():
        for prompt in requests:
            inputs = processor(text=[prompt], return_tensors="pt")
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            cache = model.new_cache(1, inputs["input_ids"].shape[1] + 4)
            position = prompt_positions(inputs["attention_mask"])
            logits = model.prefill(inputs["input_ids"], inputs["attention_mask"], position, cache, **extra)
            token = logits.argmax(-1)
            merged_alone = merge_caches([cache], room=2)  # the same join, one request
            solo_logits.append(model.decode(token[:, None], position[:, -1:] + 1, merged_alone))
            cache = model.new_cache(1, inputs["input_ids"].shape[1] + 4)
            model.prefill(inputs["input_ids"], inputs["attention_mask"], position, cache, **extra)
            caches.append(cache)
            tokens.append(token)
            positions.append(position[:, -1:] + 1)
        batched = model.decode(torch.cat(tokens)[:, None], torch.cat(positions), merge_caches(caches, room=2))
    for row, expected in enumerate(solo_logits):
        assert torch.allclose(batched[row], expected[0], atol=1e-5), row
