"""Janus text-to-image: the image-token loop with classifier-free guidance (its step, shared with the
server, is generation/image_step.py).

Conditional and unconditional rows run as one batch of 2B in every forward, into one KV cache sized
for prompt + image tokens. The unconditional row is the prompt with everything but BOS and the
begin-of-image token replaced by pad; those pads stay attended (they are the null prompt Janus was
trained with) while left padding of a batch stays masked."""

from collections.abc import Callable

import torch

from ...errors import InputError
from ...generation import image_step
from ...generation.loop import prompt_positions
from ...generation.option_types import is_whole
from ...generation.options import check_prompt_tokens
from ...generation.sampling import make_generator


def image_generation_config(base, **options):
    """``base`` (a ``GenerationConfig``) with ``options`` over it; the guidance scale is DeepSeek's 5
    when neither sets one."""
    config = base.updated(**options)
    return config if config.guidance_scale is not None else config.updated(guidance_scale=5.0)


def unconditional_prompt(input_ids: torch.Tensor, bos_id: int | None, begin_image_id: int, pad_id: int) -> torch.Tensor:
    """The null prompt: every token but BOS and begin-of-image becomes pad."""
    keep = input_ids == begin_image_id
    if bos_id is not None:
        keep |= input_ids == bos_id
    return torch.where(keep, input_ids, torch.full_like(input_ids, pad_id))


@torch.no_grad()
def generate_image_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          generation_config=None, on_step: Callable[[int, int], None] | None = None,
                          max_batch_images: int | None = None, **options) -> torch.Tensor:
    """Image tokens [B * num_return_sequences, num_image_tokens] for prompts ending in <begin_of_image>.

    Options are transformers' (``do_sample``, ``guidance_scale`` (default 5), ``temperature``, ``top_k``,
    ``top_p``, ``num_return_sequences``, ``seed``). ``max_batch_images`` splits the images into
    batches that run one after another, bounding memory; ``on_step(done, total)`` reports progress."""
    for key in ("use_cache", "pixel_values_ignored"):
        options.pop(key, None)
    if options.pop("pixel_values", None) is not None:
        raise InputError("Janus generates images from text only; pass no pixel_values with generation_mode='image'")
    config = image_generation_config(generation_config or model.generation_config, **options)
    if max_batch_images is not None and not (is_whole(max_batch_images) and max_batch_images >= 1):
        raise InputError(f"max_batch_images must be a whole number >= 1 (None: every image at once), got "
                         f"{max_batch_images!r}")
    begin_image_id = model.begin_image_token_id
    if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise InputError("image generation needs a tokenised prompt (processor(text=..., generation_mode='image'))")
    check_prompt_tokens(model, input_ids, attention_mask)
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise InputError("image generation prompts must be padded on the left, so each ends with <begin_of_image> "
                         "(processor.tokenizer.padding_side = 'left', Janus' own setting)")
    if not bool((input_ids[:, -1] == begin_image_id).all()):
        raise InputError("image generation prompts must end with the <begin_of_image> token: prepare them with "
                         "processor(text=prompt, generation_mode='image')")
    context = getattr(model, "max_context", None)
    if context is not None and input_ids.shape[1] + model.num_image_tokens > context:
        raise InputError(f"the prompt ({input_ids.shape[1]} tokens) and the image's {model.num_image_tokens} tokens are "
                         f"more than the model's context of {context} tokens; shorten the prompt")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    copies = config.num_return_sequences
    input_ids = input_ids.to(model.device).repeat_interleave(copies, dim=0)
    attention_mask = attention_mask.to(model.device).repeat_interleave(copies, dim=0)
    generator = make_generator(config.seed, model.device)
    chunk = max_batch_images or input_ids.shape[0]
    total_steps = model.num_image_tokens * -(-input_ids.shape[0] // chunk)
    done = [0]

    def progress():
        done[0] += 1
        if on_step is not None:
            on_step(done[0], total_steps)

    outputs = [_generate_batch(model, input_ids[i:i + chunk], attention_mask[i:i + chunk], config, generator,
                               progress) for i in range(0, input_ids.shape[0], chunk)]
    return torch.cat(outputs)


def prefill_guided_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config):
    """The prompts [B, T] (``attention_mask`` [B, T]) and their unconditional twins, stacked [cond; uncond],
    prefilled into a new KV cache with room for every image token: (each row's last hidden state [2B, hidden],
    each row's next position [2B, 1], the cache). ``generate`` and the server's image rows start here."""
    text = model.text_model
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    rows = torch.cat([input_ids, unconditional_prompt(input_ids, config.bos_token_id, model.begin_image_token_id,
                                                      pad_id)])
    mask = attention_mask.repeat(2, 1)
    positions = prompt_positions(mask)
    cache = text.new_cache(rows.shape[0], rows.shape[1] + model.num_image_tokens)
    hidden = text(text.embed_tokens(rows), positions, mask, cache, last_position_only=True)[:, -1]
    return hidden, positions[:, -1:] + 1, cache


def _generate_batch(model, input_ids, attention_mask, config, generator, progress) -> torch.Tensor:
    batch, num_tokens = input_ids.shape[0], model.num_image_tokens
    hidden, next_position, cache = prefill_guided_rows(model, input_ids, attention_mask, config)
    tokens = torch.empty(batch, num_tokens, dtype=torch.long, device=input_ids.device)
    for step in range(num_tokens):
        token = image_step.guided_image_token(model.model.generation_head(hidden), config, generator)
        tokens[:, step] = token
        progress()
        if step == num_tokens - 1:
            break
        hidden = image_step.decode_image_token(model, token.repeat(2), next_position, cache)
        next_position = next_position + 1
    return tokens
