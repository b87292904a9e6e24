"""Activation functions by the names transformers' configs use, each against transformers' own (ACT2FN)."""

import pytest
import torch

from vlmkit.errors import CheckpointError
from vlmkit.nn.activations import _ACTIVATIONS, get_activation

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_each_activation_computes_what_transformers_does(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 2001)
    torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x), rtol=1e-6, atol=2e-6)


def test_an_activation_vlmkit_lacks_is_a_checkpoint_error_naming_it():
    with pytest.raises(CheckpointError, match="'xielu', which vlmkit does not compute"):
        get_activation("xielu")
