"""The classifier-free-guidance image step (Janus text-to-image), written once for
``generate(generation_mode="image")`` (models/janus/image_generation.py) and the server's image rows
(serve/decoding.py).

Each image runs as two rows of one batch, conditional and unconditional. A step turns their stacked
logits into one token per image (``guided_image_token``), then feeds that token to both rows
(``decode_image_token``). The model provides ``image_token_embeddings(tokens)`` and ``text_model``."""

import torch

from ..nn.cpu_kernels import torch_ops_on_one_thread
from .sampling import next_token

# The largest classifier-free guidance weight taken (the server's bound, the CLI's): far beyond any useful
# weight (DeepSeek uses 5), and below where uncond + scale * (cond - uncond) overflows float32.
MAX_GUIDANCE_SCALE = 100.0


def guided_logits(logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on stacked [cond; uncond] logits: uncond + scale * (cond - uncond)."""
    conditional, unconditional = logits.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def guided_image_token(logits: torch.Tensor, config, generator: torch.Generator | None) -> torch.Tensor:
    """The next token [B] of B images from their stacked [cond; uncond] logits [2B, V]: guidance with
    ``config.guidance_scale``, then ``config``'s sampling (float32 math)."""
    with torch_ops_on_one_thread(logits):
        return next_token(guided_logits(logits.float(), config.guidance_scale), config, generator)


def decode_image_token(model, row_tokens: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed each row one image token ``row_tokens`` [R] at ``position_ids`` [R, 1]; each row's next
    hidden state [R, hidden] (the generation head turns it into the next image logits)."""
    embeds = model.image_token_embeddings(row_tokens)[:, None]
    return model.text_model(embeds, position_ids, None, cache)[:, -1]
