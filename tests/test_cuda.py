"""The same code on CUDA (runs only where a GPU is present): placement, dtypes and CPU parity."""

import pytest
import torch
from janus_reference import chat_inputs, ours
from quantization_support import FAMILIES, FIXTURES, forward_logits, greedy_tokens, image_prompt, vlmkit_class

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(autouse=True)
def full_float32_on_cuda():
    """cuDNN convolutions default to TF32 (~1e-3 off in the patch embeddings and the VQ decoder): compare
    true float32 arithmetic with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_device_map_and_to_cuda_give_the_cpu_greedy_answer(janus_dir, sample_images):
    from vlmkit import JanusForConditionalGeneration
    processor, cpu_model = ours(str(janus_dir))
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_images["square"]},
                                             {"type": "text", "text": "What is it?"}]}]
    inputs = chat_inputs(processor, messages)
    expected = cpu_model.generate(**inputs, max_new_tokens=12)
    for model in (JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32, device_map="cuda"),
                  JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32).to("cuda")):
        assert model.device.type == "cuda"
        got = model.generate(**inputs.to("cuda"), max_new_tokens=12)
        assert got.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_text_and_image_generation_run_on_cuda(janus_dir, sample_images, dtype):
    from vlmkit import JanusForConditionalGeneration
    processor, _ = ours(str(janus_dir))
    model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=dtype, device_map="auto")
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_images["wide"]},
                                             {"type": "text", "text": "Describe."}]}]
    out = model.generate(**chat_inputs(processor, messages).to(model.device, dtype=dtype), max_new_tokens=4)
    assert out.shape[0] == 1
    prompt = processor.apply_chat_template([{"role": "user", "content": "A cat."}], add_generation_prompt=True)
    tokens = model.generate(**processor(text=prompt, generation_mode="image"), generation_mode="image", seed=0,
                            do_sample=True, num_return_sequences=2)
    pixels = model.decode_image_tokens(tokens)
    assert pixels.shape[0] == 2 and torch.isfinite(pixels.float()).all()


def _cuda_matches_cpu(model_class, folder, inputs, new_tokens=8):
    """The model on CUDA gives the CPU's fp32 logits (to rounding) and greedy tokens."""
    cpu_model = model_class.from_pretrained(folder, dtype=torch.float32)
    assert cpu_model.device.type == "cpu"  # no device named: the CPU, as transformers
    cuda_model = model_class.from_pretrained(folder, dtype=torch.float32, device_map="cuda")
    with torch.no_grad():
        expected = cpu_model(**inputs).logits
        got = cuda_model(**inputs).logits.cpu()  # CPU inputs follow the model, as with transformers' device_map
    # float32 on both, but CUDA's SDPA and GEMM kernels sum in another order: ~2e-4 at most on these
    # checkpoints' thousands of vision tokens; greedy tokens must agree exactly
    assert torch.allclose(got, expected, atol=1e-3, rtol=0), (got - expected).abs().max()
    expected_ids = cpu_model.generate(**inputs.to("cpu"), do_sample=False, max_new_tokens=new_tokens)
    got_ids = cuda_model.generate(**inputs.to("cuda"), do_sample=False, max_new_tokens=new_tokens)
    assert got_ids.cpu().tolist() == expected_ids.tolist()


def _onevision_matches_the_cpu_on_cuda(folder, media_block):
    from vlmkit.models.llava_onevision import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    conversation = [{"role": "user", "content": [media_block, {"type": "text", "text": "What is shown?"}]}]
    inputs = LlavaOnevisionProcessor.from_pretrained(folder).apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    _cuda_matches_cpu(LlavaOnevisionForConditionalGeneration, folder, inputs)


def test_llava_onevision_anyres_image_matches_the_cpu_on_cuda(llava_onevision_dir, sample_images):
    _onevision_matches_the_cpu_on_cuda(llava_onevision_dir, {"type": "image", "image": sample_images["wide"]})


def test_llava_onevision_video_matches_the_cpu_on_cuda(llava_onevision_dir, tmp_path):
    pytest.importorskip("av")
    from fixtures_llava import write_video
    clip = write_video(tmp_path / "clip.mp4")
    _onevision_matches_the_cpu_on_cuda(llava_onevision_dir, {"type": "video", "path": str(clip)})


@pytest.mark.parametrize("variant", ["resampler", "plain"])
def test_idefics_interleaved_images_match_the_cpu_on_cuda(request, sample_images, variant):
    from vlmkit.models.idefics import IdeficsForVisionText2Text, IdeficsProcessor
    folder = request.getfixturevalue(f"idefics_{variant}_dir")
    processor = IdeficsProcessor.from_pretrained(folder)
    inputs = processor(text=["User:", sample_images["wide"], "Describe this image.", sample_images["tall"],
                             "Which is brighter?\nAssistant:"])
    _cuda_matches_cpu(IdeficsForVisionText2Text, folder, inputs)


def test_janus_image_generation_on_cuda_matches_the_cpu_logits(janus_dir):
    from vlmkit import JanusForConditionalGeneration
    processor, cpu_model = ours(str(janus_dir))
    cuda_model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32, device_map="cuda")
    prompt = processor.apply_chat_template([{"role": "user", "content": "A cat."}], add_generation_prompt=True)
    inputs = processor(text=prompt, generation_mode="image")
    tokens = cpu_model.generate(**inputs, generation_mode="image", seed=0, do_sample=True)
    with torch.no_grad():  # teacher-forced on the CPU's tokens: every step's image logits agree
        embeds = [m.image_token_embeddings(tokens.to(m.device)) for m in (cpu_model, cuda_model)]
        text = [m.text_model.embed_tokens(inputs["input_ids"].to(m.device)) for m in (cpu_model, cuda_model)]
        logits = [m(inputs_embeds=torch.cat([t, e], dim=1), generation_mode="image").logits.cpu()
                  for m, t, e in zip((cpu_model, cuda_model), text, embeds)]
        pixels = [m.decode_image_tokens(tokens.to(m.device)).cpu() for m in (cpu_model, cuda_model)]
    assert torch.allclose(logits[1], logits[0], atol=1e-4, rtol=0)
    assert torch.allclose(pixels[1], pixels[0], atol=1e-4, rtol=0)


def test_training_steps_run_on_cuda_and_resume_on_the_cpu(tmp_path):
    from test_train import tiny_recipe
    from vlmkit.models.janus.modeling import JanusForConditionalGeneration
    from vlmkit.train import Interrupted, train
    with pytest.raises(Interrupted):
        train(tiny_recipe(), tmp_path, progress=False, halt_after=6, device="cuda")  # VQ stage and 2 LM steps
    train(None, tmp_path, resume=True, progress=False, device="cpu")
    model = JanusForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_models_compute_on_cuda_what_they_do_on_the_cpu(request, family):
    from vlmkit.quant import quantized_modules
    folder = str(request.getfixturevalue(FIXTURES[family]))
    inputs = image_prompt(family, folder)
    cpu_model = vlmkit_class(family).from_pretrained(folder, dtype=torch.float32, quantization_config="int8")
    cuda_model = vlmkit_class(family).from_pretrained(folder, dtype=torch.float32, quantization_config="int8",
                                                      device_map="cuda")
    assert quantized_modules(cuda_model) == quantized_modules(cpu_model)
    assert torch.allclose(forward_logits(cuda_model, inputs).cpu(), forward_logits(cpu_model, inputs), atol=1e-3)
    assert greedy_tokens(cuda_model, inputs, family) == greedy_tokens(cpu_model, inputs, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_models_on_cuda_take_torchs_kernel_where_the_shape_allows_and_decode_in_bfloat16(request, family):
    from vlmkit.quant import quantized_modules
    from vlmkit.quant.weight_only import VISION_SIDE
    folder = str(request.getfixturevalue(FIXTURES[family]))
    model = vlmkit_class(family).from_pretrained(folder, dtype=torch.bfloat16, quantization_config="int4",
                                                 device_map="cuda")
    layers = dict(model.named_modules())
    for name, kind in quantized_modules(model).items():
        # vision-side layers are int8 by choice; the rest take torch's kernel where its shape rule allows
        fits = not name.startswith(VISION_SIDE) and layers[name].out_features % 8 == 0 \
            and layers[name].in_features % 128 == 0
        assert kind == ("Int4Linear" if fits else "Int8Linear"), name
    inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in image_prompt(family, folder).items()}
    assert len(greedy_tokens(model, inputs, family, 6)) == 6


def test_an_int4_layer_on_cuda_computes_what_it_does_on_the_cpu():
    from vlmkit.quant.weight_only import Int4Linear
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 256, generator=generator), torch.randn(96, generator=generator)
    cpu_layer = Int4Linear.from_float(weight, 128, bias, torch.bfloat16)
    cuda_layer = Int4Linear.from_float(weight.cuda(), 128, bias.cuda(), torch.bfloat16)
    assert cuda_layer.cuda_packing
    for rows in (1, 7, 300):
        x = torch.randn(2, rows, 256, generator=generator).bfloat16()
        expected = cpu_layer(x).float()
        assert torch.allclose(cuda_layer(x.cuda()).float().cpu(), expected, atol=0.03 * expected.abs().max())
