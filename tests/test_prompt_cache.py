"""Prompt prefixes reused across requests (generation/prompt_cache.py): a new question about an image
already seen skips the vision tower and the decoder over the shared prefix, and generates what a full
prefill generates."""

import pytest
import torch
from janus_reference import chat_inputs, ours

from vlmkit.generation.prompt_cache import PromptCache, common_prefix_length


def _question(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _counting_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _generate_both_ways(model, inputs, tokens=10):
    """Greedy tokens with the prompt cache as it stands, then with it off."""
    cached = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    entries = model.prompt_cache.max_entries
    model.prompt_cache.max_entries = 0
    full = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    model.prompt_cache.max_entries = entries
    return cached, full


@pytest.fixture()
def janus(janus_dir):
    from vlmkit import JanusForConditionalGeneration, JanusProcessor
    return JanusProcessor.from_pretrained(janus_dir), JanusForConditionalGeneration.from_pretrained(janus_dir)


def test_janus_second_question_about_an_image_skips_tower_and_shared_prefix(janus, sample_images):
    processor, model = janus
    tower = _counting_calls(model.model.vision_model)
    first = chat_inputs(processor, _question(sample_images["square"], "What do you see in this image?"))
    second = chat_inputs(processor, _question(sample_images["square"], "Describe the colours, please."))
    model.generate(**first, max_new_tokens=4, do_sample=False)
    assert len(tower) == 1 and model.prompt_cache.reused_tokens == 0

    cached, full = _generate_both_ways(model, second)
    shared = common_prefix_length(first["input_ids"][0], second["input_ids"][0])
    assert shared > (second["input_ids"][0] == model.config.image_token_id).sum()  # the image is in the prefix
    assert model.prompt_cache.reused_tokens == shared
    assert len(tower) == 1  # the comparison run without the prompt cache gets its features from the vision cache
    assert cached.tolist() == full.tolist()


def test_janus_prefill_logits_with_a_reused_prefix_match_a_full_prefill(janus, sample_images):
    processor, model = janus
    inputs = chat_inputs(processor, _question(sample_images["wide"], "What is on the left?"))
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    longer = torch.cat([ids, ids[:, -3:]], dim=1)  # the prompt, and three tokens on: the first is reused

    def prefill(prompt):
        cache = model.new_cache(1, prompt.shape[1] + 1)
        return model.prefill(prompt, torch.ones_like(prompt), torch.arange(prompt.shape[1])[None], cache,
                             pixel_values=pixels)

    with torch.no_grad():
        prefill(ids)
        reused = model.prompt_cache.reused_tokens
        cached = prefill(longer)
        assert model.prompt_cache.reused_tokens == reused + ids.shape[1]
        model.prompt_cache.max_entries = 0
        try:
            full = prefill(longer)
        finally:
            model.prompt_cache.max_entries = 8
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_janus_other_image_same_text_reuses_nothing(janus, sample_images):
    processor, model = janus
    text = "What do you see in this image?"
    model.generate(**chat_inputs(processor, _question(sample_images["square"], text)), max_new_tokens=2)
    cached, full = _generate_both_ways(model, chat_inputs(processor, _question(sample_images["tall"], text)))
    assert model.prompt_cache.reused_tokens == 0
    assert cached.tolist() == full.tolist()


def test_a_wrong_placeholder_count_is_still_refused_after_a_reuse(janus, sample_images):
    processor, model = janus
    inputs = chat_inputs(processor, _question(sample_images["square"], "What is it?"))
    model.generate(**inputs, max_new_tokens=2)
    image_token = model.config.image_token_id
    doubled = torch.cat([inputs["input_ids"], torch.full((1, 3), image_token)], dim=1)
    with pytest.raises(Exception, match="image"):
        model.generate(input_ids=doubled, attention_mask=torch.ones_like(doubled),
                       pixel_values=inputs["pixel_values"], max_new_tokens=2)


def test_onevision_second_question_reuses_the_image_prefix(onevision_vlmkit, sample_images):
    processor, model = onevision_vlmkit
    model.prompt_cache.clear()
    model.vision_cache.clear()
    tower = _counting_calls(model.model.multi_modal_projector)

    def inputs(text):
        return processor.apply_chat_template(_question(sample_images["wide"], text), add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")

    model.generate(**inputs("What is shown?"), max_new_tokens=3, do_sample=False)
    assert len(tower) == 1
    reused = model.prompt_cache.reused_tokens
    second = inputs("Which colours are there?")
    cached = model.generate(**second, max_new_tokens=10, do_sample=False)
    assert model.prompt_cache.reused_tokens > reused + (second["input_ids"] == model.config.image_token_id).sum()
    assert len(tower) == 1  # the second request never reached the vision tower
    model.prompt_cache.max_entries, model.vision_cache.max_entries = 0, 0
    try:
        assert model.generate(**second, max_new_tokens=10, do_sample=False).tolist() == cached.tolist()
        assert len(tower) == 2
    finally:
        model.prompt_cache.max_entries, model.vision_cache.max_entries = 8, 32


def test_onevision_features_of_a_seen_image_equal_fresh_ones(onevision_vlmkit, sample_images):
    processor, model = onevision_vlmkit
    pixels = processor.image_processor([sample_images["tall"], sample_images["square"]], return_tensors="pt")
    with torch.no_grad():
        model.get_image_features(pixels["pixel_values"][:1], pixels["image_sizes"][:1])
        cached = model.get_image_features(pixels["pixel_values"], pixels["image_sizes"])
        model.vision_cache.max_entries = 0
        fresh = model.get_image_features(pixels["pixel_values"], pixels["image_sizes"])
        model.vision_cache.max_entries = 32
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))


def test_next_chat_turn_replaces_the_turn_it_extends():
    from vlmkit.nn.kv_cache import KVCache
    cache, model = PromptCache(max_entries=4), torch.nn.Linear(1, 1)
    kv = KVCache(2, 1, 1, 4, 16, torch.float32, torch.device("cpu"))
    kv.keys.normal_()
    logits = torch.zeros(1, 10)
    cache.store(model, torch.arange(5)[None], b"", kv, logits)
    cache.store(model, torch.arange(9)[None], b"", kv, logits)  # the same conversation, one turn on
    cache.store(model, torch.tensor([[7, 7, 7]]), b"", kv, logits)
    assert len(cache) == 2
    fresh = KVCache(2, 1, 1, 4, 16, torch.float32, torch.device("cpu"))
    length, source, whole = cache.restore(model, torch.arange(12)[None], b"", fresh)
    assert length == 9 and source.tolist() == list(range(9)) and whole is None
    assert torch.equal(fresh.keys[:, :, :, :9], kv.keys[:, :, :, :9])
    assert cache.restore(model, torch.arange(12)[None], b"other media", fresh)[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_prompt_again_answers_exactly_as_the_first_time(janus_dir, sample_images, dtype):
    """A repeated request takes its prompt's keys/values and last logits as they were: recomputing the last
    position alone rounds otherwise (in bfloat16 enough to change a greedy answer)."""
    from vlmkit import JanusForConditionalGeneration

    processor, _ = ours(str(janus_dir))
    model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=dtype)
    inputs = chat_inputs(processor, _question(sample_images["square"], "What is in the middle?"))
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    first = model.generate(**inputs, **options)
    reused = model.prompt_cache.reused_tokens
    again = model.generate(**inputs, **options)
    assert model.prompt_cache.reused_tokens == reused + inputs["input_ids"].shape[1]  # the whole prompt
    assert torch.equal(again.sequences, first.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, first.scores))


def test_a_stored_prompt_is_a_view_of_its_requests_cache_which_decoding_leaves_intact(janus, sample_images):
    """No copy of the keys/values (a fresh 118 MB for a Janus-Pro-1B image prompt): the entry views the
    request's cache, whose later decode steps write only past the prompt."""
    from vlmkit.generation.decode import decode_one_token
    processor, model = janus
    inputs = chat_inputs(processor, _question(sample_images["square"], "What is in the middle?"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = model.new_cache(1, ids.shape[1] + 3)
    with torch.no_grad():
        logits = model.prefill(ids, mask, torch.arange(ids.shape[1])[None], cache, pixel_values=inputs["pixel_values"])
        (entry,) = model.prompt_cache._entries.values()
        assert entry.keys.untyped_storage().data_ptr() == cache.keys.untyped_storage().data_ptr()
        stored = entry.keys.clone(), entry.values.clone()
        token = logits.argmax(-1, keepdim=True)
        for step in range(3):
            token = decode_one_token(model, token, torch.tensor([[ids.shape[1] + step]]), cache).argmax(-1, keepdim=True)
    assert cache.length == ids.shape[1] + 3
    assert torch.equal(entry.keys, stored[0]) and torch.equal(entry.values, stored[1])
    assert model.prompt_cache._bytes == entry.nbytes == cache.keys.nbytes + cache.values.nbytes
