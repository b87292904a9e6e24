"""nn/decoder.py's DecoderModel: a prefill that asks for its last position alone gets what the full
forward gives there, and leaves the same keys/values in the cache."""

import pytest
import torch

from vlmkit.nn.decoder import DecoderConfig, DecoderModel


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
    # the last layer's MLP runs on one row instead of seven: a differently shaped product, same values
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert last_cache.length == full_cache.length == 7
    written = (slice(None), slice(None), slice(None), slice(0, 7))
    assert torch.equal(last_cache.keys[written], full_cache.keys[written])
    assert torch.equal(last_cache.values[written], full_cache.values[written])
