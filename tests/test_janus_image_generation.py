"""Janus text-to-image against transformers: greedy image tokens, decoded pixels, postprocessed
images; seeded sampling; padding; VQ encoding as DeepSeek's model does it."""

import numpy as np
import pytest
import torch
from janus_reference import ours, reference


def image_prompt(processor, text):
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def prompts(janus_dir):
    ref_processor, _ = reference(str(janus_dir))
    return [image_prompt(ref_processor, "A dog running under the rain."), image_prompt(ref_processor, "A cat.")]


def test_prompt_and_image_mode_inputs_match_reference(janus_dir, prompts):
    ref_processor, _ = reference(str(janus_dir))
    processor, _ = ours(str(janus_dir))
    assert image_prompt(processor, "A dog running under the rain.") == prompts[0]
    for text in (prompts[0], prompts):
        padding = isinstance(text, list)
        expected = ref_processor(text=text, generation_mode="image", return_tensors="pt", padding=padding)
        got = processor(text=text, generation_mode="image", return_tensors="pt", padding=padding)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_greedy_image_tokens_pixels_and_images_match_reference(janus_dir, prompts):
    ref_processor, ref_model = reference(str(janus_dir))
    processor, model = ours(str(janus_dir))
    expected = ref_model.generate(**ref_processor(text=prompts[0], generation_mode="image", return_tensors="pt"),
                                  generation_mode="image", do_sample=False)
    got = model.generate(**processor(text=prompts[0], generation_mode="image"), generation_mode="image",
                         do_sample=False)
    assert got.tolist() == expected.tolist()
    with torch.no_grad():
        expected_pixels = ref_model.decode_image_tokens(expected)
    pixels = model.decode_image_tokens(got)
    assert pixels.shape == expected_pixels.shape
    assert torch.allclose(pixels, expected_pixels, atol=1e-4, rtol=0)
    # the transformers Janus example's call, channels-last; transformers 5 needs channels-first here (a known defect)
    images = processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    expected_images = ref_processor.postprocess(list(expected_pixels.float().permute(0, 3, 1, 2)),
                                                return_tensors="PIL.Image.Image")["pixel_values"]
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in expected_images]
    assert images[0].mode == "RGB"


def test_padded_batch_of_prompts_matches_reference_and_each_prompt_alone(janus_dir, prompts):
    ref_processor, ref_model = reference(str(janus_dir))
    processor, model = ours(str(janus_dir))
    expected = ref_model.generate(**ref_processor(text=prompts, generation_mode="image", return_tensors="pt",
                                                  padding=True), generation_mode="image", do_sample=False)
    got = model.generate(**processor(text=prompts, generation_mode="image", padding=True), generation_mode="image",
                         do_sample=False)
    assert got.tolist() == expected.tolist()
    for row, text in enumerate(prompts):
        alone = model.generate(**processor(text=text, generation_mode="image"), generation_mode="image",
                               do_sample=False)
        assert alone[0].tolist() == got[row].tolist()


def test_seed_example_samples_two_different_images_and_repeats_with_the_same_seed(janus_dir, prompts):
    processor, model = ours(str(janus_dir))
    inputs = processor(text=prompts[0], generation_mode="image", return_tensors="pt").to(model.device,
                                                                                        dtype=torch.float32)
    model.generation_config.num_return_sequences = 2
    try:
        first = model.generate(**inputs, generation_mode="image", do_sample=True, use_cache=True, seed=11)
        again = model.generate(**inputs, generation_mode="image", do_sample=True, use_cache=True, seed=11)
    finally:
        model.generation_config.num_return_sequences = 1
    assert first.shape == (2, model.num_image_tokens)
    assert first[0].tolist() != first[1].tolist()
    assert first.tolist() == again.tolist()
    images = processor.postprocess(list(model.decode_image_tokens(first).float()),
                                   return_tensors="PIL.Image.Image")["pixel_values"]
    assert len(images) == 2 and images[0].size == images[1].size


def test_splitting_images_into_batches_keeps_greedy_results(janus_dir, prompts):
    processor, model = ours(str(janus_dir))
    inputs = processor(text=prompts, generation_mode="image", padding=True)
    whole = model.generate(**inputs, generation_mode="image", do_sample=False, num_return_sequences=2)
    split = model.generate(**inputs, generation_mode="image", do_sample=False, num_return_sequences=2,
                           max_batch_images=1)
    assert whole.tolist() == split.tolist()


def test_vq_encode_uses_l2_normalised_codes_like_deepseek_not_transformers(janus_dir, sample_images):
    ref_processor, ref_model = reference(str(janus_dir))
    processor, model = ours(str(janus_dir))
    pixels = processor.image_processor([sample_images["square"], sample_images["wide"]])["pixel_values"]
    vq = model.model.vqmodel
    with torch.no_grad():
        latents = vq.quant_conv(vq.encoder(pixels))
        codebook = vq.quantize.embedding.weight
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        normalised = torch.nn.functional.normalize
        expected = torch.cdist(normalised(flat, dim=-1), normalised(codebook, dim=-1)).argmin(-1).view(2, -1)
        ours_tokens = vq.encode(pixels)
        raw_tokens = vq.encode(pixels, l2_normalized=False)
        transformers_tokens = ref_model.model.vqmodel.encode(pixels).image_tokens.view(2, -1)
    assert ours_tokens.tolist() == expected.tolist()
    # transformers 5 searches the raw codebook: that is our l2_normalized=False, and it differs
    assert raw_tokens.tolist() == transformers_tokens.tolist()
    assert ours_tokens.tolist() != raw_tokens.tolist()


def test_patchwise_tokens_depend_on_their_patch_alone(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    vq = model.model.vqmodel
    pixels = processor.image_processor([sample_images["square"]])["pixel_values"]
    side = 2 ** (len(vq.config.channel_multiplier) - 1)  # the encoder's downsampling factor
    grid = pixels.shape[-1] // side
    changed = pixels.clone()
    changed[..., side:, :] = torch.rand_like(changed[..., side:, :]) * 2 - 1  # all but the first row of patches
    with torch.no_grad():
        latents = vq.latents(pixels, patchwise=True)
        assert latents.shape[-2:] == (grid, grid)
        # the definition: each patch, edge-padded by its side, encoded as a picture of its own
        for row, col in [(0, 0), (1, 2), (grid - 1, grid - 1)]:
            patch = pixels[..., row * side:(row + 1) * side, col * side:(col + 1) * side]
            alone = torch.nn.functional.pad(patch, (side,) * 4, mode="replicate")
            assert torch.allclose(latents[..., row, col], vq.latents(alone, patchwise=False)[..., 1, 1], atol=1e-5)
        assert torch.equal(vq.encode(pixels, patchwise=True)[:, :grid], vq.encode(changed, patchwise=True)[:, :grid])
        # whole-picture encoding mixes the rest of the image into every token
        assert not torch.allclose(vq.latents(pixels)[..., 0, :], vq.latents(changed)[..., 0, :])
    assert not vq.patchwise  # DeepSeek's and transformers' checkpoints encode whole pictures


def test_image_training_loss_over_generation_head(janus_dir, prompts):
    processor, model = ours(str(janus_dir))
    inputs = processor(text=prompts[0], generation_mode="image")
    tokens = torch.randint(0, model.config.vq_config.num_embeddings, (1, 6))
    embeds = torch.cat([model.text_model.embed_tokens(inputs["input_ids"]), model.image_token_embeddings(tokens)], 1)
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), tokens], 1)
    output = model(inputs_embeds=embeds, labels=labels, generation_mode="image")
    assert output.logits.shape[-1] == model.config.vq_config.num_embeddings
    output.loss.backward()
    assert model.model.generation_head.vision_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_clear_errors_for_bad_image_generation_requests(janus_dir, prompts, sample_images):
    from vlmkit import InputError
    from vlmkit.engine import Engine
    processor, model = ours(str(janus_dir))
    with pytest.raises(InputError, match="text only"):
        processor(text=prompts[0], images=[sample_images["square"]], generation_mode="image")
    with pytest.raises(InputError, match="begin_of_image"):
        model.generate(**processor(text="hello"), generation_mode="image")
    engine = Engine(model, processor, "janus")
    with pytest.raises(InputError, match="empty"):
        engine.imagine("   ")
    with pytest.raises(InputError, match="context of"):  # the prompt plus the image's tokens must fit
        long_prompt = processor(text="a red circle " * model.max_context, generation_mode="image")
        model.generate(**long_prompt, generation_mode="image")
    image_prompt = processor(text=prompts[0], generation_mode="image")
    for batch in (0, -1, 1.5):
        with pytest.raises(InputError, match="max_batch_images must be a whole number >= 1"):
            model.generate(**image_prompt, generation_mode="image", max_batch_images=batch)
    for seed in (2**64, -(2**63) - 1, 1.5):  # past what a torch generator takes, or not a whole number
        for mode in ("image", "text"):
            with pytest.raises(InputError, match="seed must be a whole number from"):
                model.generate(**(image_prompt if mode == "image" else processor(text="hello")), do_sample=True,
                               generation_mode=mode, seed=seed, max_new_tokens=2)


def test_imagine_takes_guidance_and_temperature_from_the_checkpoint_unless_given(janus_dir):
    from dataclasses import replace

    from vlmkit.engine import Engine
    processor, model = ours(str(janus_dir))
    engine = Engine(model, processor, "janus")
    shared = model.generation_config  # the model is cached for other tests: restore its settings
    try:
        model.generation_config = replace(shared, guidance_scale=None)
        deepseek = engine.imagine("a red circle", seed=4, guidance_scale=5.0, temperature=1.0)[0].tobytes()
        assert engine.imagine("a red circle", seed=4)[0].tobytes() == deepseek  # neither sets it: CFG 5
        model.generation_config = replace(shared, guidance_scale=1.5, temperature=0.7)
        own = engine.imagine("a red circle", seed=4)[0].tobytes()
        assert own == engine.imagine("a red circle", seed=4, guidance_scale=1.5, temperature=0.7)[0].tobytes()
        assert own != deepseek
        assert engine.imagine("a red circle", seed=4, guidance_scale=5.0, temperature=1.0)[0].tobytes() == deepseek
    finally:
        model.generation_config = shared


@pytest.mark.parametrize("return_tensors", ["np", "pt", None])
def test_postprocess_gives_pixels_in_their_own_layout_as_transformers(janus_dir, return_tensors):
    processor, model = ours(str(janus_dir))
    ref_processor, _ = reference(str(janus_dir))
    pixels = model.decode_image_tokens(torch.arange(2 * model.num_image_tokens).reshape(2, -1) % 7).float()
    first = pixels.permute(0, 3, 1, 2)  # channels first, as transformers' decode_image_tokens gives them
    got = processor.postprocess(list(first), return_tensors=return_tensors)["pixel_values"]
    want = ref_processor.postprocess(list(first), return_tensors=return_tensors)["pixel_values"]
    assert type(got) is type(want)
    stacked = np.asarray(got if return_tensors else np.stack(got))
    np.testing.assert_array_equal(stacked, np.asarray(want if return_tensors else np.stack(want)))
    # channels last (vlmkit's decode_image_tokens, which transformers' postprocess cannot take): the same
    # pixels, channels last
    last = processor.postprocess(list(pixels), return_tensors=return_tensors)["pixel_values"]
    np.testing.assert_array_equal(np.asarray(last if return_tensors else np.stack(last)), stacked.transpose(0, 2, 3, 1))
