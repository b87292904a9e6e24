"""Classifier-free guidance for text (``generate(guidance_scale=..., negative_prompt_ids=...)``), as
transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor (Sanchez et al., "Stay on topic with
Classifier-Free Guidance"): beside the prompt, the model reads an unconditional branch (the negative
prompt, or else only the prompt's last token) in its own cache, and each step's log-probabilities are
pushed away from that branch's: ``uncond + guidance_scale * (cond - uncond)``.

The image step of Janus guides otherwise (a batched unconditional prompt, image_step.py); this is the
text loop's, run through the model's transformers-style forward with ``past_key_values``.
"""

import torch

from ..errors import InputError


class TextGuidance:
    """The guidance step for ``prompts`` prompts of ``copies`` rows each (their return sequences or beams)."""

    reference_name = "UnbatchedClassifierFreeGuidanceLogitsProcessor"

    def __init__(self, guidance_scale: float, model, prompts: int, copies: int, negative_prompt_ids=None,
                 negative_prompt_attention_mask=None):
        self.guidance_scale, self.model = float(guidance_scale), model
        self.input_ids, self.attention_mask = _negative_prompt(negative_prompt_ids, negative_prompt_attention_mask,
                                                               prompts, copies, model)
        self.cache = None

    def _unconditional_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # first step: the whole branch (by default the prompt's last token)
            ids = self.input_ids if self.input_ids is not None else input_ids[:, -1:]
            mask = self.attention_mask if self.attention_mask is not None else torch.ones_like(ids)
        else:  # then the token just drawn, the mask growing with it
            ids = input_ids[:, -1:]
            mask = torch.cat([self.attention_mask, torch.ones_like(ids)], dim=1)
        self.attention_mask = mask
        out = self.model(ids, attention_mask=mask, use_cache=True, past_key_values=self.cache)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def __call__(self, input_ids, scores):
        scores = scores.log_softmax(dim=-1)
        if self.guidance_scale == 1:
            return scores
        unconditional = self._unconditional_logits(input_ids).log_softmax(dim=-1)
        return self.guidance_scale * (scores - unconditional) + unconditional


def _negative_prompt(ids, mask, prompts: int, copies: int, model):
    """The negative prompt's ids and mask on the model's device, a row per prompt (one row serves them
    all) repeated for the prompt's copies."""
    if ids is None:
        if mask is not None:
            raise InputError("negative_prompt_attention_mask needs negative_prompt_ids")
        return None, None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point:
        raise InputError("negative_prompt_ids must be a tensor of token ids [batch, length] (tokenize the negative "
                         "prompt as the prompt, e.g. processor.tokenizer(text, return_tensors='pt').input_ids)")
    limit = getattr(model, "token_id_count", None)
    if limit is not None and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise InputError(f"negative_prompt_ids hold ids outside the model's vocabulary of {limit} tokens")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"negative_prompt_attention_mask {tuple(mask.shape)} must have negative_prompt_ids' shape "
                         f"{tuple(ids.shape)}")
    if ids.shape[0] not in (1, prompts):
        raise InputError(f"negative_prompt_ids has {ids.shape[0]} rows for {prompts} prompts; give one row per "
                         f"prompt, or one for all")
    copies *= prompts // ids.shape[0]
    ids = ids.to(model.device).repeat_interleave(copies, dim=0)
    if mask is not None:
        mask = mask.to(model.device).repeat_interleave(copies, dim=0)
    return ids, mask
