#!/usr/bin/env python
"""One decode step with a JSON Schema grammar against one without, on a real-shape checkpoint: the
model's step, the request's logits pipeline and the draw, as the server runs them
(``serve.batching.sample_rows``). Run by hand (not part of CI):

    python scripts/bench_constrained_decode.py PATH/TO/Janus-Pro-1B [--steps 24] [--rounds 3]

Prints the median milliseconds per step of each, their ratio, and the one-time costs (llguidance's
vocabulary table, compiling the schema)."""

import argparse
import statistics
import time

import torch

from vlmkit import JanusForConditionalGeneration
from vlmkit.generation.grammar import grammar_tokenizer
from vlmkit.generation.logits import GrammarConstraint
from vlmkit.generation.loop import prompt_positions
from vlmkit.io.tokenizer import Tokenizer
from vlmkit.serve.batching import RowSampling, sample_rows

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 2000},
                                           "score": {"type": "integer"}},
          "required": ["answer", "score"], "additionalProperties": False}


def run(model, prompt, steps, constraint_factory) -> list[float]:
    """Per-step seconds of ``steps`` decode steps after a fresh prefill of ``prompt``."""
    config = model.generation_config.updated(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    mask = torch.ones_like(prompt)
    positions = prompt_positions(mask)
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    logits = model.prefill(prompt, mask, positions, cache)
    constraint = constraint_factory(prompt.shape[1])
    processors = [constraint] if constraint is not None else []
    generator = torch.Generator().manual_seed(0)
    seen = prompt.clone()
    times = []
    position = positions[:, -1:] + 1
    for _ in range(steps):
        start = time.perf_counter()
        token = sample_rows(logits, [RowSampling([0], config, generator, seen, processors)])
        logits = model.decode(token[:, None], position, cache)
        times.append(time.perf_counter() - start)
        seen = torch.cat([seen, token[:, None]], dim=1)
        position = position + 1
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = JanusForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    tokenizer = Tokenizer.from_pretrained(args.model)
    prompt = torch.tensor([tokenizer.encode("Answer in JSON: what is in a red square?")])
    vocab = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    start = time.perf_counter()
    tokens = grammar_tokenizer(tokenizer.backend, vocab, tuple(model.generation_config.eos_token_ids))
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens.json_matcher(SCHEMA)
    compile_s = time.perf_counter() - start

    def constrained(prompt_length):
        return GrammarConstraint([tokens.json_matcher(SCHEMA)], prompt_length, tokens.vocab_size)

    free, bound = [], []
    with torch.no_grad():
        run(model, prompt, 4, lambda _: None)  # warm-up
        for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits both alike
            free += run(model, prompt, args.steps, lambda _: None)
            bound += run(model, prompt, args.steps, constrained)
    free_ms, bound_ms = 1000 * statistics.median(free), 1000 * statistics.median(bound)
    print(f"vocabulary {vocab} tokens, scores {model.config.text_config.vocab_size} wide; torch threads "
          f"{torch.get_num_threads()}")
    print(f"one-time: llguidance vocabulary table {table_s:.2f} s, schema compile {1000 * compile_s:.1f} ms")
    print(f"decode step, median of {len(free)}: unconstrained {free_ms:.1f} ms, json_schema {bound_ms:.1f} ms, "
          f"ratio {bound_ms / free_ms:.3f}")


if __name__ == "__main__":
    main()
