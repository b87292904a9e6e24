"""One decode story: ``generate``'s text path prefills once and then runs generation/decode.py's
one-token step for every further token, and Janus' ``generate(generation_mode="image")`` and the
server's image rows draw every image token through the one CFG image step (generation/image_step.py)."""

import inspect
from pathlib import Path

import torch
from serve_support import engine_for

import vlmkit

import vlmkit.generation.beam as beam
import vlmkit.generation.image_step as image_step
import vlmkit.generation.loop as loop
from vlmkit.models.base import PretrainedVLM
from vlmkit.serve.config import ServeConfig
from vlmkit.serve.requests import RequestHandler
from vlmkit.serve.scheduler import Scheduler


def counted(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that records each call; the list of calls."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_text_generate_prefills_once_then_decodes_each_token_with_the_shared_step(janus_dir, monkeypatch):
    model = engine_for(janus_dir).model
    prompts = counted(monkeypatch, loop, "prefill")
    steps = counted(monkeypatch, loop, "decode_one_token")
    input_ids = torch.tensor([[1, 20, 21, 22, 23]])
    sequences = model.generate(input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert sequences.shape[1] == input_ids.shape[1] + 6
    assert len(prompts) == 1
    assert len(steps) == 5  # the prefill's logits give the first token
    assert all(args[0] is model for args in steps)


def vlmkit_frames() -> list[str]:
    """The calling functions inside vlmkit, outermost first, as "file:function" (torch's module plumbing
    and the tests left out)."""
    root = Path(vlmkit.__file__).parent
    frames = [(Path(f.filename), f.function) for f in inspect.stack()[2:]]
    return [f"{path.relative_to(root)}:{name}" for path, name in reversed(frames) if path.is_relative_to(root)]


def test_from_generate_to_the_attention_call_is_three_hops(janus_dir):
    """A reader of ``generate`` (every model's, the loop itself; Janus' first switches between text and image
    generation) finds the one-token step, then the decoder, then the layer that calls the attention:
    generate -> decode_one_token -> DecoderModel.forward -> DecoderLayer.forward."""
    model = engine_for(janus_dir).model
    assert PretrainedVLM.generate is loop.generate
    layer = model.text_model.layers[0]
    stacks = []
    handle = layer.self_attn.register_forward_pre_hook(lambda module, args: stacks.append(vlmkit_frames()))
    try:
        model.generate(torch.tensor([[1, 20, 21, 22]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    decode_stacks = [stack for stack in stacks if "generation/decode.py:decode_one_token" in stack]
    assert len(decode_stacks) == 2
    for stack in decode_stacks:
        chain = stack[stack.index("generation/loop.py:generate"):]
        assert chain == ["generation/loop.py:generate", "generation/decode.py:decode_one_token",
                         "nn/decoder.py:forward", "nn/decoder.py:forward"]


def test_beam_search_decodes_with_the_same_shared_step(janus_dir, monkeypatch):
    model = engine_for(janus_dir).model
    steps = counted(monkeypatch, beam, "decode_one_token")
    model.generate(torch.tensor([[1, 20, 21, 22]]), max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    assert len(steps) == 2


def test_janus_generate_image_draws_and_feeds_every_image_token_through_the_shared_cfg_step(janus_dir, monkeypatch):
    engine = engine_for(janus_dir)
    model, processor = engine.model, engine.processor
    draws = counted(monkeypatch, image_step, "guided_image_token")
    feeds = counted(monkeypatch, image_step, "decode_image_token")
    tokens = model.generate(**processor(text="A red square.", generation_mode="image"), generation_mode="image",
                            do_sample=False)
    assert tokens.shape == (1, model.num_image_tokens)
    assert (len(draws), len(feeds)) == (model.num_image_tokens, model.num_image_tokens - 1)


def test_the_servers_image_rows_draw_and_feed_every_image_token_through_the_same_cfg_step(janus_dir, monkeypatch):
    engine = engine_for(janus_dir)
    draws = counted(monkeypatch, image_step, "guided_image_token")
    feeds = counted(monkeypatch, image_step, "decode_image_token")
    scheduler = Scheduler(engine)
    job = scheduler.submit(RequestHandler(engine, ServeConfig(model="m")).prepare_images({"prompt": "a red square"})[1])
    scheduler.start()
    try:
        assert len(job.wait(60).images) == 1
    finally:
        scheduler.stop()
    tokens = engine.model.num_image_tokens
    assert (len(draws), len(feeds)) == (tokens, tokens - 1)
