"""When rows stop: end-of-sequence tokens, stop strings and the user's stopping criteria, checked
after every step by the decoding loop (loop.py) and beam search (beam.py)."""

import time
from collections.abc import Callable

import torch

from ..errors import InputError
from .config import GenerationConfig


class MaxTime:
    """Every row stops once ``max_time`` seconds have passed since generation started (transformers'
    MaxTimeCriteria)."""

    def __init__(self, max_time: float):
        self.max_time, self.start = max_time, time.time()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), time.time() - self.start > self.max_time, dtype=torch.bool,
                          device=input_ids.device)


class Stopping:
    """Which rows a step finished: an end-of-sequence token, a stop string, or a user's criterion
    (transformers' ``StoppingCriteriaList`` without the length limit, which the loops count)."""

    def __init__(self, config: GenerationConfig, prompt_length: int, should_stop=None, criteria=(),
                 end_token_ids: list[int] | None = None):
        self.eos = torch.tensor(config.eos_token_ids if end_token_ids is None else end_token_ids, dtype=torch.long)
        self.prompt_length, self.should_stop, self.criteria = prompt_length, should_stop, list(criteria)
        if config.max_time is not None:
            self.criteria.insert(0, MaxTime(config.max_time))

    def __call__(self, sequences: torch.Tensor, scores, last_tokens: torch.Tensor) -> torch.Tensor | None:
        """``sequences`` [rows, T] so far (prompt included); ``last_tokens`` [rows]: their last column.
        None when nothing can stop a row (no end-of-sequence token, no criteria)."""
        done = None
        if self.eos.numel():
            if self.eos.device != sequences.device:
                self.eos = self.eos.to(sequences.device)
            done = torch.isin(last_tokens, self.eos)
        if self.should_stop is not None:
            hits = self.should_stop(sequences, self.prompt_length)
            done = hits if done is None else done | hits
        for criterion in self.criteria:
            hits = torch.as_tensor(criterion(sequences, scores), device=sequences.device).bool()
            done = hits if done is None else done | hits
        return done


def stop_string_checker(tokenizer, stop_strings: list[str]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``should_stop(sequences, prompt_length)`` for the text loop (loop.py): rows whose text holds a stop
    string that ends in the generated tokens; as transformers' StopStringCriteria, it may begin in the prompt
    (one wholly inside the prompt does not count)."""
    # a tail long enough for the longest stop string: a byte-level token may hold a single byte of a character
    window = max(max(len(s.encode("utf-8")) for s in stop_strings) + 1, 8)

    def should_stop(sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
        # checked after every step, so only the last tokens can hold a stop string not found before
        new = sequences.shape[1] - prompt_length
        tails = sequences[:, -window:].tolist()
        hits = []
        for tail in tails:
            text = tokenizer.decode(tail)
            before = len(tokenizer.decode(tail[:max(len(tail) - new, 0)]))  # the prompt's part of the tail
            hits.append(any(text.find(s, max(before - len(s) + 1, 0)) >= 0 for s in stop_strings))
        return torch.tensor(hits, dtype=torch.bool, device=sequences.device)

    return should_stop


def stop_strings_check(config: GenerationConfig, tokenizer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The stop-string check ``config.stop_strings`` asks for (None without stop strings)."""
    if not config.stop_strings:
        return None
    if tokenizer is None:
        raise InputError("stop_strings needs the tokenizer: pass tokenizer=processor.tokenizer")
    stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
    return stop_string_checker(tokenizer, stops)
