"""Sampling warpers: what reshapes the distribution a token is drawn from (temperature, top-H, top-k,
top-p, min-p, typical, epsilon and eta cutoffs), each matching the transformers warper it names. They run
last in the logits pipeline (logits.py), and only when sampling."""

from collections.abc import Callable

import torch

from .config import GenerationConfig

Warper = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Temperature:
    """Scores divided by the temperature (transformers' TemperatureLogitsWarper)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopH:
    """Top-H: of the 100 likeliest tokens, the likeliest ones whose entropy terms (-p log p, p renormalised
    over those 100) add up to at most ``top_h`` times the entropy of the 100, and the likeliest one always
    (transformers' TopHLogitsWarper)."""

    CANDIDATES = 100

    def __init__(self, top_h: float):
        self.top_h = top_h

    def __call__(self, input_ids, scores):
        best, order = torch.topk(scores, min(self.CANDIDATES, scores.shape[-1]), dim=-1)
        log_probs = best - best.logsumexp(dim=-1, keepdim=True)
        probs = log_probs.softmax(dim=-1)
        # the entropy as torch's Categorical computes it (from the normalised logits), the running sum from
        # log(p): the same arithmetic as the reference, so a token on the boundary falls the same way
        entropy = -(log_probs.clamp(min=torch.finfo(log_probs.dtype).min) * probs).sum(dim=-1, keepdim=True)
        keep = (-probs * probs.log()).cumsum(dim=-1) <= entropy * self.top_h
        keep[:, 0] = True
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, keep)
        return scores.masked_fill(~kept, -torch.inf)


class TopK:
    """All but the ``top_k`` best scores set to -inf (transformers' TopKLogitsWarper)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids, scores):
        k = min(self.top_k, scores.shape[-1])
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -torch.inf)


class TopP:
    """Only the smallest set of best tokens whose probability reaches ``top_p`` kept (transformers'
    TopPLogitsWarper)."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p, self.min_tokens_to_keep = float(top_p), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -torch.inf)


class MinP:
    """Tokens less likely than ``min_p`` times the likeliest one removed (transformers' MinPLogitsWarper)."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p, self.min_tokens_to_keep = min_p, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        best = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, best, False)
        return scores.masked_fill(remove, -torch.inf)


class Typical:
    """Locally typical sampling: the tokens whose surprise is closest to the entropy, up to ``mass``
    (transformers' TypicalLogitsWarper)."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1):
        self.mass, self.min_tokens_to_keep = float(mass), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        normalized = torch.nn.functional.log_softmax(scores, dim=-1)
        entropy = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
        shifted = torch.abs((-normalized) - entropy)
        sorted_shifted, order = torch.sort(shifted, descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1).clamp_(max=sorted_shifted.shape[-1] - 1)
        remove = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
        remove[..., :self.min_tokens_to_keep] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -torch.inf)


class EpsilonCutoff:
    """Tokens less likely than ``epsilon`` removed (transformers' EpsilonLogitsWarper)."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        self.epsilon, self.min_tokens_to_keep = float(epsilon), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        remove = scores.softmax(dim=-1) < self.epsilon
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove = remove & (scores < torch.topk(scores, k)[0][..., -1, None])
        return scores.masked_fill(remove, -torch.inf)


class EtaCutoff:
    """Tokens less likely than min(eta, sqrt(eta) * exp(-entropy)) removed (transformers' EtaLogitsWarper)."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        self.epsilon, self.min_tokens_to_keep = float(epsilon), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        epsilon = torch.tensor(self.epsilon, device=scores.device)
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        eta = torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None]
        remove = scores.softmax(dim=-1) < eta
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove = remove & (scores < torch.topk(scores, k)[0][..., -1, None])
        return scores.masked_fill(remove, -torch.inf)


def sampling_warpers(config: GenerationConfig, min_tokens_to_keep: int = 1) -> list[Warper]:
    """Temperature, top-H, top-k, top-p, min-p, typical, epsilon and eta, as ``config`` sets them, in the
    reference's order (used when sampling)."""
    warpers: list[Warper] = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(Temperature(config.temperature))
    if config.top_h is not None:
        warpers.append(TopH(config.top_h))
    if config.top_k:
        warpers.append(TopK(config.top_k, min_tokens_to_keep))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopP(config.top_p, min_tokens_to_keep))
    if config.min_p is not None:
        warpers.append(MinP(config.min_p, min_tokens_to_keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(Typical(config.typical_p, min_tokens_to_keep))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonCutoff(config.epsilon_cutoff, min_tokens_to_keep))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaCutoff(config.eta_cutoff, min_tokens_to_keep))
    return warpers
