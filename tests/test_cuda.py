"""The same code on CUDA (runs only where a GPU is present): placement, dtypes and CPU parity."""

import pytest
import torch
from janus_reference import chat_inputs, ours

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


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
