"""LLaVA-OneVision's vision tower: a SigLIP ViT whose features are read from inner hidden states
(``vision_feature_layer``), not from its final LayerNorm."""

import torch

from ...errors import CheckpointError
from ...nn.vit import SiglipViT


class SiglipVisionTransformer(SiglipViT):
    """SigLIP ViT built from a ``SiglipVisionConfig``. Features come from inner hidden states, so the final LayerNorm is loaded but the
    reference never applies it to them (hidden_states[-1] is taken before post_layernorm)."""

    def hidden_states(self, pixel_values: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Hidden states at ``indices`` (0 = patch embeddings, i = after layer i, negative from the
        end), concatenated on the feature axis; layers past the deepest one asked for are not run."""
        num_layers = len(self.encoder.layers)
        wanted = [i + num_layers + 1 if i < 0 else i for i in indices]
        if any(not 0 <= i <= num_layers for i in wanted):
            raise CheckpointError(f"vision_feature_layer {indices} is outside the tower's {num_layers} layers")
        states = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers[:max(wanted)]:
            states.append(layer(states[-1]))
        if len(wanted) == 1:
            # as it is, not through cat's contiguous copy: the reference hands the projector the transposed layout
            # the patch conv leaves, and a half-precision Linear rounds differently on it than on a contiguous copy
            return states[wanted[0]]
        return torch.cat([states[i] for i in wanted], dim=-1)
