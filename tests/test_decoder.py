"""nn/decoder.py's DecoderModel: a prefill that asks for its last position alone gets what the full
forward gives there, and leaves the same keys/values in the cache; the rotary of a decode step keeps off
torch's thread pool."""

import pytest
import torch

from vlmkit.nn.cpu_kernels import kernels_enabled
from vlmkit.nn.decoder import DecoderConfig, DecoderModel
from vlmkit.nn.rotary import FEW_POSITIONS, RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_position_only_prefill_equals_the_full_forward_at_its_last_position(dtype):
    config = DecoderConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, model_type="qwen2")
    torch.manual_seed(0)
    model = DecoderModel(config).to(dtype).eval()
    embeds = torch.randn(2, 7, 64).to(dtype)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row: its last position is still the last one
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full_cache, last_cache = model.new_cache(2, 9), model.new_cache(2, 9)
        full = model(embeds, positions, mask, full_cache)
        last = model(embeds, positions, mask, last_cache, last_position_only=True)
    assert last.shape == (2, 1, 64)
    # the last layer's query, attention and MLP run on one row instead of seven: differently shaped products
    # (and in bf16, the one-query attention kernel): float32 agrees to its rounding, bf16 errs no more
    # than the full bf16 forward does against float32 arithmetic
    if dtype == torch.float32:
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    else:
        with torch.no_grad():
            exact = model.float()(embeds.float(), positions, mask, model.new_cache(2, 9))[:, -1:]
        full_error = (full[:, -1:].float() - exact).abs().max()
        assert (last.float() - exact).abs().max() <= 1.5 * full_error
    assert last_cache.length == full_cache.length == 7
    written = (slice(None), slice(None), slice(None), slice(0, 7))
    assert torch.equal(last_cache.keys[written], full_cache.keys[written])
    assert torch.equal(last_cache.values[written], full_cache.values[written])


@pytest.mark.skipif(not kernels_enabled(), reason="needs vlmkit's CPU kernels (x86 with AVX2 and FMA)")
def test_a_decode_steps_rotary_runs_on_one_thread_and_a_prefills_on_all(monkeypatch):
    """torch's cos/sin start MKL's OpenMP team even for a decode step's 128 values, and that team then spins on
    the cores the decode kernels need: a decode step's rotary runs on one thread, a long prefill's on all."""
    threads_seen = []
    original_cos = torch.Tensor.cos
    monkeypatch.setattr(torch.Tensor, "cos", lambda self: threads_seen.append(torch.get_num_threads())
                        or original_cos(self))
    rotary = RotaryEmbedding(64)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        step_cos, _ = rotary(torch.tensor([[5], [9]]), torch.bfloat16)
        prefill_cos, _ = rotary(torch.arange(FEW_POSITIONS + 1)[None], torch.bfloat16)
        assert threads_seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    # the same values whichever way they were computed
    assert torch.equal(step_cos[1], prefill_cos[0, 9:10])


@pytest.mark.skipif(not kernels_enabled(), reason="needs vlmkit's CPU kernels (x86 with AVX2 and FMA)")
def test_a_decode_steps_activations_and_small_products_run_on_one_thread(monkeypatch):
    """torch's GELU (oneDNN) and small bf16 products start OpenMP teams for any size: Janus' image head and
    aligner ran them twice a CFG step, and the teams spun on the next step's cores."""
    from torch.nn import functional as F

    from vlmkit.nn import activations
    from vlmkit.nn.cpu_kernels import linear
    threads_seen = []

    def record(*args, original, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return original(*args, **kwargs)
    monkeypatch.setitem(activations._ACTIVATIONS, "gelu", lambda x: record(x, original=F.gelu))
    monkeypatch.setattr(F, "linear", lambda *args, original=F.linear: record(*args, original=original))
    gelu = activations.get_activation("gelu")
    assert activations.get_activation("gelu") is gelu  # one wrapper per function: layers compare them by identity
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = torch.randn(2, 2048).bfloat16()
        assert torch.equal(gelu(small), F.gelu(small))
        gelu(torch.randn(activations.FEW_VALUES + 1).bfloat16())
        linear(torch.randn(2, 8).bfloat16(), torch.randn(2048, 8).bfloat16())  # Janus' image aligner's fc1
        linear(torch.randn(600, 8).bfloat16(), torch.randn(2048, 8).bfloat16())  # a prefill's many rows
        assert threads_seen == [1, 2, 1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
