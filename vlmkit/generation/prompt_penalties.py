"""Logits processors that read the prompt: transformers' "encoder" penalties, which a decoder-only model's
``generate`` applies to the prompt's token ids (its ``encoder_input_ids`` are the prompt).

Each class names the transformers processor it matches; tests/test_generate_options.py keeps them
token-identical with transformers' ``generate``. The prompt is each row's first ``prompt_length`` ids,
padding included, as the reference reads it.
"""

import torch


class PromptRepetitionPenalty:
    """Scores of tokens found in the prompt multiplied by ``penalty`` (divided when negative): above 1
    the model is drawn to the prompt's words, below 1 away from them (transformers'
    EncoderRepetitionPenaltyLogitsProcessor, ``encoder_repetition_penalty``)."""

    reference_name = "EncoderRepetitionPenaltyLogitsProcessor"

    def __init__(self, penalty: float, prompt_length: int):
        # stored inverted and applied as the reference does, for the same float rounding
        self.inverse, self.prompt_length = 1 / float(penalty), prompt_length

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        # ids past the scores (an embedding larger than the head, image tokens) land in a spare column
        prompt = input_ids[:, :self.prompt_length].clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        score = padded.gather(1, prompt)
        score = torch.where(score < 0, score * self.inverse, score / self.inverse)
        return padded.scatter(1, prompt, score)[..., :vocab]


class NoPromptNGram:
    """A token that would repeat an n-gram of the prompt is banned: wherever the last ``ngram_size - 1``
    tokens also stand in the prompt, the tokens that followed them there are not drawn (transformers'
    EncoderNoRepeatNGramLogitsProcessor, ``encoder_no_repeat_ngram_size``)."""

    reference_name = "EncoderNoRepeatNGramLogitsProcessor"

    def __init__(self, ngram_size: int, prompt_length: int):
        self.ngram_size, self.prompt_length = ngram_size, prompt_length

    def __call__(self, input_ids, scores):
        n = self.ngram_size
        if self.prompt_length < n:
            return scores  # the prompt holds no n-gram
        windows = input_ids[:, :self.prompt_length].unfold(dimension=1, size=n, step=1)
        recent = input_ids[:, input_ids.shape[1] + 1 - n:]
        matches = (windows[..., :-1] == recent.unsqueeze(1)).all(dim=-1)
        vocab = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -torch.inf)
