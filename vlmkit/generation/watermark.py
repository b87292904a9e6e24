"""Watermarked text: ``generate(watermarking_config=...)`` as transformers' ``WatermarkingConfig`` (Kirchenbauer
et al., "On the Reliability of Watermarks for Large Language Models"): before each token a pseudo-random
"green" share of the vocabulary, seeded by the tokens before it, gets a bias, so that text drawn this way
carries a statistical mark that transformers' ``WatermarkDetector`` finds from the token ids alone.

The green lists come from torch's own generator with the reference's seeds, so vlmkit draws exactly
the tokens transformers' WatermarkLogitsProcessor would (tests/test_generate_options.py).
"""

import numbers

import torch

from ..errors import InputError

# WatermarkingConfig's settings and defaults
DEFAULTS = {"greenlist_ratio": 0.25, "bias": 2.0, "hashing_key": 15485863, "seeding_scheme": "lefthash",
            "context_width": 1}
# the reference's table of seeds for the "selfhash" scheme (a permutation of this many values)
TABLE_SIZE = 1_000_003
# "selfhash" tries the likeliest this many tokens (the original implementation's number)
SELFHASH_CANDIDATES = 40


def watermark_settings(config) -> dict:
    """The checked settings of ``config``: transformers' ``WatermarkingConfig`` or a dict of its keys."""
    if not isinstance(config, dict):
        if type(config).__name__ == "SynthIDTextWatermarkingConfig":
            raise InputError("watermarking_config: vlmkit implements transformers' WatermarkingConfig (green lists), "
                             "not SynthID-Text; pass a WatermarkingConfig or leave it unset")
        if not callable(getattr(config, "to_dict", None)):
            raise InputError(f"watermarking_config must be a transformers WatermarkingConfig or a dict of its "
                             f"settings, got {type(config).__name__}")
        config = config.to_dict()
    unknown = sorted(set(config) - set(DEFAULTS) - {"transformers_version"})
    if unknown:
        raise InputError(f"watermarking_config: unknown setting(s) {', '.join(unknown)}; it takes "
                         f"{', '.join(DEFAULTS)}")
    settings = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS and v is not None}}
    ratio, bias = settings["greenlist_ratio"], settings["bias"]
    if not _real(ratio) or not 0 < ratio < 1:
        raise InputError(f"watermarking_config: greenlist_ratio must be between 0 and 1 (exclusive), got {ratio!r}")
    if not _real(bias) or not torch.isfinite(torch.tensor(float(bias))):
        raise InputError(f"watermarking_config: bias must be a finite number (the reference advises 0.5 to 2), "
                         f"got {bias!r}")
    if settings["seeding_scheme"] not in ("lefthash", "selfhash"):
        raise InputError(f"watermarking_config: seeding_scheme must be 'lefthash' or 'selfhash', got "
                         f"{settings['seeding_scheme']!r}")
    for name in ("hashing_key", "context_width"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (name == "context_width"):
            raise InputError(f"watermarking_config: {name} must be an integer >= {int(name == 'context_width')}, "
                             f"got {value!r}")
    return settings


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Watermark:
    """The green-list bias (transformers' WatermarkLogitsProcessor), for a vocabulary of ``vocab_size``
    tokens (the text model's, which the head may exceed; None: the scores' width)."""

    reference_name = "WatermarkLogitsProcessor"

    def __init__(self, config, vocab_size: int | None = None):
        settings = watermark_settings(config)
        self.vocab_size, self.greenlist_ratio = vocab_size, settings["greenlist_ratio"]
        self.bias = settings["bias"]
        self.hash_key = settings["hashing_key"]
        self.context_width = settings["context_width"]
        self.selfhash = settings["seeding_scheme"] == "selfhash"
        self._fixed_table: torch.Tensor | None = None
        self._rng: torch.Generator | None = None

    def _generator(self, device) -> torch.Generator:
        if self._rng is None or self._rng.device != torch.device(device):
            self._rng = torch.Generator(device=device)
            if self.selfhash:  # the reference draws the table first, from the hashing key
                self._rng.manual_seed(self.hash_key)
                self._fixed_table = torch.randperm(TABLE_SIZE, generator=self._rng, device=device)
        return self._rng

    def green_ids(self, context: torch.Tensor) -> torch.Tensor:
        """The green tokens after ``context`` (a row's token ids) [greenlist_size]."""
        rng = self._generator(context.device)
        context = context[-self.context_width:]
        if self.selfhash:
            a = self._fixed_table[context % TABLE_SIZE] + 1
            b = self._fixed_table[context[-1] % TABLE_SIZE] + 1
            seed = (self.hash_key * a * b).min().item()
        else:
            seed = self.hash_key * context[-1].item()
        rng.manual_seed(seed % (2**64 - 1))
        greenlist_size = int(self.vocab_size * self.greenlist_ratio)
        return torch.randperm(self.vocab_size, device=context.device, generator=rng)[:greenlist_size]

    def _selfhash_green_ids(self, row: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The likeliest candidates that are green in the list their own choice would seed."""
        candidates = scores.sort(descending=True).indices[:SELFHASH_CANDIDATES]
        kept = [token for token in candidates
                if bool((self.green_ids(torch.cat([row, token[None]])) == token).any())]
        return torch.stack(kept) if kept else candidates[:0]

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] < self.context_width:
            return scores  # too few tokens to seed from: this step is not marked, as in the reference
        if self.vocab_size is None:
            self.vocab_size = scores.shape[-1]
        processed = scores.clone()
        for index, row in enumerate(input_ids):
            green = self._selfhash_green_ids(row, scores[index]) if self.selfhash else self.green_ids(row)
            green = green[green < scores.shape[-1]]  # a config's vocabulary larger than the head: no such scores
            processed[index, green] = processed[index, green] + self.bias
        return processed
