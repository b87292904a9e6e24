"""The logits pipeline: every option that reshapes a step's scores before the next token is picked.

A pipeline is a plain list of callables ``(input_ids [B, T], scores [B, V]) -> scores``, the shape of
transformers' logits processors, so a user's own processors join the list as they are and the server
can drive the same list per request. ``logits_processors`` builds it in the order of transformers'
``GenerationMixin._get_logits_processor`` (each class names the transformers processor it matches, and
tests/test_generate_options.py keeps them token-identical): text guidance (text_guidance.py), sequence
bias, the prompt's repetition penalty (prompt_penalties.py), repetition penalty, no-repeat n-grams (the
sequence's, then the prompt's), bad words, minimum lengths, the prefix constraint, forced tokens, invalid
values, suppressed tokens, then the user's processors, then the sampling warpers (temperature, top-k,
top-p, min-p, typical), the watermark (watermark.py), then renormalisation. With no
option set the list is empty and the decode step does no work for it.
"""

import numbers
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from .config import GenerationConfig
from .prompt_penalties import NoPromptNGram, PromptRepetitionPenalty
from .warpers import sampling_warpers
from .watermark import Watermark

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def apply_processors(processors: Sequence[LogitsProcessor], input_ids: torch.Tensor,
                     scores: torch.Tensor) -> torch.Tensor:
    """``scores`` through every processor in turn."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


class _VocabMask:
    """A boolean mask over the vocabulary, made on first use (the vocabulary size comes with the scores)."""

    def __init__(self, token_ids):
        self.token_ids = [int(t) for t in token_ids]
        self._mask: torch.Tensor | None = None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.device != scores.device:
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            self._mask = torch.isin(vocab, torch.tensor(self.token_ids, dtype=torch.long, device=scores.device))
        return self._mask


class MinLength(_VocabMask):
    """End-of-sequence tokens banned while the sequence is shorter than ``min_length`` tokens, the prompt's
    first ``skip`` tokens not counted (transformers' MinLength / MinNewTokensLength processors)."""

    def __init__(self, min_length: int, eos_token_ids, skip: int = 0):
        super().__init__(eos_token_ids)
        self.min_length, self.skip = min_length, skip
        self.reference_name = "MinNewTokensLengthLogitsProcessor" if skip else "MinLengthLogitsProcessor"

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] - self.skip < self.min_length:
            return torch.where(self.mask(scores), -torch.inf, scores)
        return scores


class SuppressTokens(_VocabMask):
    """Tokens never generated, or (``at_length``) not as the token after a sequence of that length
    (transformers' SuppressTokens / SuppressTokensAtBegin processors)."""

    def __init__(self, token_ids, at_length: int | None = None):
        super().__init__(token_ids)
        self.at_length = at_length
        self.reference_name = "SuppressTokensLogitsProcessor" if at_length is None else \
            "SuppressTokensAtBeginLogitsProcessor"

    def __call__(self, input_ids, scores):
        if self.at_length is None or input_ids.shape[-1] == self.at_length:
            return torch.where(self.mask(scores), -torch.inf, scores)
        return scores


class AllowedTokens(_VocabMask):
    """Only these tokens may be drawn (vLLM's ``allowed_token_ids``)."""

    def __call__(self, input_ids, scores):
        return torch.where(self.mask(scores), scores, -torch.inf)


class RepetitionPenalty:
    """Scores of tokens already in the sequence divided by ``penalty`` (multiplied when negative), left
    padding not counted (transformers' RepetitionPenaltyLogitsProcessor with ``prompt_ignore_length``)."""

    reference_name = "RepetitionPenaltyLogitsProcessor"

    def __init__(self, penalty: float, padding_lengths: torch.Tensor | None = None):
        self.penalty, self.padding_lengths = penalty, padding_lengths

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        if self.padding_lengths is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < self.padding_lengths[:, None], vocab)
        # ids past the scores (padding, or an embedding larger than the head) land in a spare column
        input_ids = input_ids.clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        score = padded.gather(1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return padded.scatter(1, input_ids, score)[..., :vocab]


class NoRepeatNGram:
    """A token that would repeat an n-gram already in the sequence is banned (transformers'
    NoRepeatNGramLogitsProcessor)."""

    reference_name = "NoRepeatNGramLogitsProcessor"

    def __init__(self, ngram_size: int):
        self.ngram_size = ngram_size

    def __call__(self, input_ids, scores):
        n, length = self.ngram_size, input_ids.shape[-1]
        if length < n:
            return scores
        prefix = input_ids[:, length + 1 - n:]
        windows = input_ids.unfold(dimension=1, size=n, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        vocab = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -torch.inf)


class SequenceBias:
    """An additive bias on the last token of each given sequence, applied when the tokens before it end
    the sequence so far (always, for one-token sequences) (transformers' SequenceBiasLogitsProcessor).

    ``sequence_bias``: ``[[token_ids, bias], ...]`` or ``{tuple(token_ids): bias}``."""

    reference_name = "SequenceBiasLogitsProcessor"

    def __init__(self, sequence_bias):
        self.sequence_bias = _bias_dict(sequence_bias)
        self._prepared: tuple | None = None

    def _prepare(self, scores):
        vocab = scores.shape[-1]
        too_big = [t for ids in self.sequence_bias for t in ids if t >= vocab]
        if too_big:
            raise InputError(f"the model's vocabulary has {vocab} tokens, but these token ids are biased or banned: "
                             f"{too_big}")
        single = torch.zeros(vocab, dtype=torch.float, device=scores.device)
        by_prefix_length: dict[int, list] = {}
        for ids, bias in self.sequence_bias.items():
            if len(ids) == 1:
                single[ids[0]] = bias
            else:
                by_prefix_length.setdefault(len(ids) - 1, []).append((ids, bias))
        device = scores.device
        groups = [(torch.tensor([ids[:-1] for ids, _ in group], device=device),
                   torch.tensor([ids[-1] for ids, _ in group], device=device),
                   torch.tensor([bias for _, bias in group], dtype=torch.float, device=device))
                  for group in by_prefix_length.values()]
        self._prepared = (single, groups)

    def __call__(self, input_ids, scores):
        if self._prepared is None:
            self._prepare(scores)
        single, groups = self._prepared
        # summed into one bias first, then added, in the reference's order (same float rounding)
        bias = torch.zeros_like(scores)
        bias += single
        for prefixes, last_tokens, biases in groups:
            prefix_length = prefixes.shape[1]
            if prefix_length > input_ids.shape[1]:
                continue
            matching = (input_ids[:, None, -prefix_length:] == prefixes).all(dim=-1)
            bias.index_add_(1, last_tokens, torch.where(matching, biases, 0.0).to(bias.dtype))
        return scores + bias


class NoBadWords(SequenceBias):
    """Sequences that are never completed: each one's last token is banned where the rest ends the
    sequence so far (transformers' NoBadWordsLogitsProcessor; a lone end-of-sequence token is not banned)."""

    reference_name = "NoBadWordsLogitsProcessor"

    def __init__(self, bad_words_ids: list[list[int]], eos_token_ids=()):
        super().__init__({tuple(ids): float("-inf") for ids in self.kept(bad_words_ids, eos_token_ids)})

    @staticmethod
    def kept(bad_words_ids, eos_token_ids=()) -> list[list[int]]:
        """The checked sequences to ban, without lone end-of-sequence tokens (transformers drops those; none
        may be left, and then nothing is banned)."""
        if not isinstance(bad_words_ids, (list, tuple)) or not bad_words_ids or \
                any(not isinstance(ids, (list, tuple)) or not ids for ids in bad_words_ids):
            raise InputError(f"bad_words_ids must be a non-empty list of token-id lists, got {bad_words_ids!r}")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for ids in bad_words_ids for t in ids):
            raise InputError(f"bad_words_ids must hold token ids (integers >= 0), got {bad_words_ids!r}")
        eos = [int(t) for t in eos_token_ids]
        return [list(ids) for ids in bad_words_ids if all(list(ids) != [e] for e in eos)]


class PrefixConstrained:
    """Only the tokens ``allowed(batch_id, input_ids_of_the_row)`` returns; where none of them is
    possible for a prompt, its allowed tokens are forced (transformers' PrefixConstrainedLogitsProcessor)."""

    reference_name = "PrefixConstrainedLogitsProcessor"

    def __init__(self, allowed: Callable[[int, torch.Tensor], list[int]], num_beams: int = 1):
        self.allowed, self.num_beams = allowed, num_beams

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, -torch.inf)
        prompts = input_ids.shape[0] // self.num_beams
        for row in range(input_ids.shape[0]):
            allowed = self.allowed(row // self.num_beams, input_ids[row])
            if len(allowed) == 0:
                raise InputError(f"prefix_allowed_tokens_fn allowed no token for batch id {row // self.num_beams}: "
                                 "the constraint cannot be met")
            mask[row, allowed] = 0
        processed = scores + mask
        unsatisfiable = processed.amax(dim=-1).isneginf().view(prompts, -1).all(dim=-1, keepdim=True)
        return torch.where(unsatisfiable.repeat_interleave(self.num_beams, dim=0), mask, processed)


class ForcedToken:
    """The next token forced when the sequence is ``at_length`` long (transformers' ForcedBOSToken /
    ForcedEOSToken processors: BOS after one token, EOS as the last token ``max_length`` allows)."""

    def __init__(self, token_ids, at_length: int):
        self.token_ids = [int(t) for t in (token_ids if isinstance(token_ids, (list, tuple)) else [token_ids])]
        self.at_length = at_length
        self.reference_name = "ForcedBOSTokenLogitsProcessor" if at_length == 1 else "ForcedEOSTokenLogitsProcessor"

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.at_length:
            return scores
        forced = torch.full_like(scores, -torch.inf)
        forced[:, self.token_ids] = 0
        return forced


class RemoveInvalidValues:
    """NaN scores to 0 and infinite ones to the dtype's extremes (transformers' InfNanRemoveLogitsProcessor)."""

    reference_name = "InfNanRemoveLogitsProcessor"

    def __call__(self, input_ids, scores):
        processed = torch.where(scores != scores, 0.0, scores)
        processed = torch.where(scores == float("inf"), torch.finfo(scores.dtype).max, processed)
        return torch.where(scores == -float("inf"), torch.finfo(scores.dtype).min, processed)


class ExponentialDecayLengthPenalty:
    """From ``start`` new tokens on, end-of-sequence scores raised by ``|score| * (factor ** n - 1)``
    after n more tokens (transformers' ExponentialDecayLengthPenalty)."""

    reference_name = "ExponentialDecayLengthPenalty"

    def __init__(self, start_and_factor, eos_token_ids, prompt_length: int):
        self.start = int(start_and_factor[0]) + prompt_length
        self.factor = float(start_and_factor[1])
        self.eos_token_ids = [int(t) for t in eos_token_ids]

    def __call__(self, input_ids, scores):
        length = input_ids.shape[-1]
        if length <= self.start:
            return scores
        eos_scores = scores[:, self.eos_token_ids]
        penalty = torch.abs(eos_scores) * (pow(self.factor, length - self.start) - 1)
        penalties = torch.zeros_like(scores)
        penalties[:, self.eos_token_ids] = penalty.masked_fill(~torch.isfinite(eos_scores), 0.0)
        return scores + penalties


class LogSoftmax:
    """Scores renormalised to log-probabilities (transformers' LogitNormalization, ``renormalize_logits``)."""

    def __call__(self, input_ids, scores):
        return scores.log_softmax(dim=-1)


def logits_processors(config: GenerationConfig, prompt_length: int, padding_lengths: torch.Tensor | None = None,
                      custom: Sequence[LogitsProcessor] = (), max_length: int | None = None, *,
                      guidance: LogitsProcessor | None = None,
                      vocab_size: int | None = None) -> list[LogitsProcessor]:
    """The pipeline ``config`` asks for, for prompts ``prompt_length`` tokens long (padding included);
    ``padding_lengths`` [rows]: each row's left padding (None: no padding), which the repetition penalty
    skips; ``custom``: the user's ``logits_processor`` list, run after the built-in bans; ``max_length``:
    the longest a sequence may grow (prompt included), where ``forced_eos_token_id`` applies;
    ``guidance``: text classifier-free guidance (text_guidance.py), first as in transformers;
    ``vocab_size``: the text model's vocabulary, which a watermark's green lists are drawn from (None:
    the scores' width)."""
    eos = config.eos_token_ids
    processors: list[LogitsProcessor] = [guidance] if guidance is not None else []
    if config.sequence_bias is not None:
        processors.append(SequenceBias(config.sequence_bias))
    if config.encoder_repetition_penalty not in (None, 1.0):
        processors.append(PromptRepetitionPenalty(config.encoder_repetition_penalty, prompt_length))
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenalty(float(config.repetition_penalty), padding_lengths))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.encoder_no_repeat_ngram_size:
        processors.append(NoPromptNGram(config.encoder_no_repeat_ngram_size, prompt_length))
    banned = NoBadWords.kept(config.bad_words_ids, eos) if config.bad_words_ids is not None else []
    if banned:
        processors.append(NoBadWords(banned))
    if eos and config.min_length and config.min_new_tokens is None:  # min_new_tokens takes precedence
        processors.append(MinLength(config.min_length, eos))
    if eos and config.min_new_tokens:
        processors.append(MinLength(config.min_new_tokens, eos, skip=prompt_length))
    if config.prefix_allowed_tokens_fn is not None:
        processors.append(PrefixConstrained(config.prefix_allowed_tokens_fn, config.num_beams))
    if config.forced_bos_token_id is not None:
        processors.append(ForcedToken(config.forced_bos_token_id, at_length=1))
    if config.forced_eos_token_id is not None and max_length is not None:
        processors.append(ForcedToken(config.forced_eos_token_id, at_length=max_length - 1))
    if config.remove_invalid_values:
        processors.append(RemoveInvalidValues())
    if config.exponential_decay_length_penalty is not None and eos:
        processors.append(ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos, prompt_length))
    if config.suppress_tokens is not None:
        processors.append(SuppressTokens(config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        processors.append(SuppressTokens(config.begin_suppress_tokens, at_length=prompt_length))
    processors = _merge(processors, list(custom))
    if config.do_sample:
        # beam sampling keeps a token besides every end-of-sequence one, so beams can go on
        keep = 1 if config.num_beams == 1 else len(eos) + 1 if eos else 2
        processors.extend(sampling_warpers(config, min_tokens_to_keep=keep))
    if config.watermarking_config is not None:  # after every other change to the scores, as transformers
        processors.append(Watermark(config.watermarking_config, vocab_size))
    if config.renormalize_logits:
        processors.append(LogSoftmax())
    return processors


def _merge(built: list, custom: list) -> list:
    """The user's processors after the built-in ones; one of transformers' own processor classes takes
    the place of the built-in processor it matches, as transformers' ``_merge_criteria_processor_list``."""
    by_name = {type(processor).__name__: processor for processor in reversed(custom)}
    merged = [by_name.get(getattr(processor, "reference_name", None), processor) for processor in built]
    return merged + [processor for processor in custom if not any(processor is m for m in merged)]


def _bias_dict(sequence_bias) -> dict[tuple[int, ...], float]:
    """``{tuple(token_ids): bias}`` from either form transformers accepts, checked."""
    if isinstance(sequence_bias, dict):
        pairs = list(sequence_bias.items())
    elif isinstance(sequence_bias, (list, tuple)):
        pairs = [tuple(pair) if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, None)
                 for pair in sequence_bias]
    else:
        pairs = []
    valid = bool(pairs) and all(
        isinstance(ids, (list, tuple)) and ids and all(isinstance(t, numbers.Integral) and t >= 0 for t in ids)
        and isinstance(bias, numbers.Real) for ids, bias in pairs)
    if not valid:
        raise InputError("sequence_bias must be a non-empty list of [token_ids, bias] pairs (e.g. [[[10, 45], -2.0]]) "
                         f"or a dict {{(10, 45): -2.0}}, got {sequence_bias!r}")
    return {tuple(int(t) for t in ids): float(bias) for ids, bias in pairs}


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (the prompt's first
    ``prompt_length`` tokens not counted): ``score -= presence * (count > 0) + frequency * count``."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, prompt_length: int = 0):
        self.presence, self.frequency, self.prompt_length = float(presence), float(frequency), prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        vocab = scores.shape[-1]
        counts = torch.zeros((scores.shape[0], vocab + 1), dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated.clamp(max=vocab), torch.ones_like(generated, dtype=scores.dtype))
        counts = counts[:, :vocab]
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class LogitBias:
    """OpenAI's ``logit_bias``: ``{token_id: bias}`` added to those tokens' scores at every step
    (-100 all but bans a token, 100 all but forces it)."""

    def __init__(self, bias: dict[int, float]):
        self.token_ids = torch.tensor([int(t) for t in bias], dtype=torch.long)
        self.values = torch.tensor([float(b) for b in bias.values()], dtype=torch.float)

    def __call__(self, input_ids, scores):
        if self.token_ids.device != scores.device:
            self.token_ids, self.values = self.token_ids.to(scores.device), self.values.to(scores.device)
        return scores.index_add(1, self.token_ids, self.values.to(scores.dtype).expand(scores.shape[0], -1))
