"""Vision features remembered by image content (nn/feature_cache.py) in Janus: a repeated image skips the
tower and nothing about the results changes."""

import torch
from janus_reference import chat_inputs

from vlmkit.nn.feature_cache import FeatureCache


def _question(image, text="What do you see in this image?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _fresh_model(janus_dir):
    from vlmkit import JanusForConditionalGeneration, JanusProcessor
    return JanusProcessor.from_pretrained(janus_dir), JanusForConditionalGeneration.from_pretrained(janus_dir)


def test_repeated_image_reuses_features_and_results_stay_identical(janus_dir, sample_images):
    processor, model = _fresh_model(janus_dir)
    inputs = chat_inputs(processor, _question(sample_images["square"]))
    calls = []
    model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = model(**inputs).logits
        again = model(**chat_inputs(processor, _question(sample_images["square"], "Describe it."))).logits
        model.vision_cache.max_entries = 0  # the uncached computation, for comparison
        uncached = model(**inputs).logits
    assert len(calls) == 2  # the second request never reached the tower
    assert model.vision_cache.hits == 1
    assert torch.equal(first, uncached)
    assert again.shape[1] > 0
    tokens = model.generate(**inputs, max_new_tokens=8)
    model.vision_cache.max_entries = 32
    assert model.generate(**inputs, max_new_tokens=8).tolist() == tokens.tolist()


def test_a_batch_mixing_seen_and_new_images_gets_the_same_features_as_without_cache(janus_dir, sample_images):
    processor, model = _fresh_model(janus_dir)
    pixels = processor.image_processor([sample_images["square"], sample_images["wide"], sample_images["square"]])
    pixels = pixels["pixel_values"]
    with torch.no_grad():
        model.get_image_features(pixels[:1])
        cached = model.get_image_features(pixels)
        model.vision_cache.max_entries = 0
        uncached = model.get_image_features(pixels)
    assert torch.equal(cached, uncached)


def test_cache_is_bypassed_while_training_and_emptied_when_weights_change(janus_dir, sample_images):
    processor, model = _fresh_model(janus_dir)
    pixels = processor.image_processor([sample_images["tall"]])["pixel_values"]
    features = model.get_image_features(pixels)  # autograd on: the tower may be trained
    assert features.requires_grad and len(model.vision_cache) == 0
    with torch.no_grad():
        before = model.get_image_features(pixels)
        model.model.aligner.fc1.bias.add_(1.0)
        after = model.get_image_features(pixels)
    assert len(model.vision_cache) == 1 and not torch.equal(before, after)


def test_cache_drops_least_recently_used_entries_within_its_budget():
    cache = FeatureCache(max_entries=2)
    encode = lambda images: images * 2  # noqa: E731
    a, b, c = (torch.full((1, 3), float(v)) for v in (1, 2, 3))
    for image in (a, b, a, c):  # a is used again before c arrives, so b is the one dropped
        cache.features(image, encode)
    assert len(cache) == 2
    cache.features(a, encode)
    cache.features(b, encode)
    assert (cache.hits, cache.misses) == (2, 4)
    small = FeatureCache(max_entries=8, max_bytes=24)  # room for two 3-float features
    small.features(torch.tensor([[1.0, 1, 1], [2, 2, 2]]), encode)
    assert len(small) == 2
    small.features(torch.tensor([[3.0, 3, 3]]), encode)
    assert len(small) == 2
