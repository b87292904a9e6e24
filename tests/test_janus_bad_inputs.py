"""Bad inputs give clear vlmkit errors, never a stack trace from inside torch."""

import http.server
import threading
import time

import pytest
import torch
from janus_reference import chat_inputs, ours

from vlmkit import InputError, MediaError, TemplateError


def test_more_images_than_placeholders_and_the_reverse(janus_dir, sample_images):
    processor, _ = ours(str(janus_dir))
    prompt = "<image_placeholder>\nWhat is it?"
    with pytest.raises(InputError, match="1 image placeholder.*2 image"):
        processor(text=prompt, images=[sample_images["square"], sample_images["wide"]])
    with pytest.raises(InputError, match="2 image placeholder.*1 image"):
        processor(text=prompt + "<image_placeholder>", images=[sample_images["square"]])
    with pytest.raises(InputError, match="placeholder"):
        processor(text=prompt)


def test_model_refuses_pixels_that_do_not_fit_the_image_tokens(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    inputs = processor(text="<image_placeholder> hi", images=[sample_images["square"]])
    with pytest.raises(InputError, match="image tokens"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(InputError, match="no pixel_values"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)


def test_unreadable_and_truncated_images(janus_dir, tmp_path, sample_images):
    processor, _ = ours(str(janus_dir))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    sample_images["square"].save(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "?"}]}]
        with pytest.raises(MediaError, match=path.name):
            chat_inputs(processor, messages)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(2)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_image_url_that_times_out(janus_dir):
    from vlmkit import JanusProcessor
    from vlmkit.io.media import MediaPolicy
    processor = JanusProcessor.from_pretrained(janus_dir, media_policy=MediaPolicy(timeout_s=0.3))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/slow.png"
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "?"}]}]
    try:
        started = time.monotonic()
        with pytest.raises(MediaError, match="timed out|timeout"):
            chat_inputs(processor, messages)
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()


def test_prompt_longer_than_the_context(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    too_many = [{"type": "image", "image": sample_images["square"]}] * 40  # 40 x 18 tokens > 512
    inputs = chat_inputs(processor, [{"role": "user", "content": too_many + [{"type": "text", "text": "?"}]}])
    with pytest.raises(InputError, match="context of 512"):
        model.generate(**inputs, max_new_tokens=4)


def test_generation_options_that_cannot_work(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    inputs = processor(text="hello")
    with pytest.raises(InputError, match="unknown generation option|unexpected argument"):
        model.generate(**inputs, max_new_tokenz=3)
    with pytest.raises(InputError, match="num_beams"):
        model.generate(**inputs, num_beams=0)
    with pytest.raises(InputError, match="generation_mode"):
        model.generate(**inputs, generation_mode="video")


def test_chat_template_runs_in_a_sandbox(janus_dir):
    processor, _ = ours(str(janus_dir))
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="unsafe"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=evil)


def test_stop_strings_end_generation(janus_dir, sample_images):
    processor, model = ours(str(janus_dir))
    inputs = chat_inputs(processor, [{"role": "user", "content": [{"type": "image", "image": sample_images["square"]},
                                                                  {"type": "text", "text": "Describe."}]}])
    full = model.generate(**inputs, max_new_tokens=24)
    text = processor.decode(full[0, inputs["input_ids"].shape[1]:])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    stopped = model.generate(**inputs, max_new_tokens=24, stop_strings=[stop], tokenizer=processor.tokenizer)
    assert stopped.shape[1] < full.shape[1]
    assert stop in processor.decode(stopped[0, inputs["input_ids"].shape[1]:])
