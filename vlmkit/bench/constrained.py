"""One decode step with a JSON Schema grammar against one without (vlmkit only: transformers has no
grammar): the model's step, the request's logits pipeline and the draw, as the server runs them
(``serve.batching.sample_rows``). ``vlmkit bench --constrained`` runs it on the Janus checkpoint; by hand:

    python -m vlmkit.bench.constrained PATH/TO/Janus-Pro-1B [--steps 24] [--rounds 3]

Reports the median milliseconds per step of each, their ratio, and the one-time costs (llguidance's
vocabulary table, compiling the schema)."""

import argparse
import statistics
import time

import torch

from ..generation.grammar import GrammarConstraint, grammar_tokenizer
from ..generation.loop import prompt_positions
from ..io.tokenizer import Tokenizer
from ..serve.batching import RowSampling, sample_rows

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


def constrained_decode_row(model, folder, steps: int = 24, rounds: int = 3) -> dict:
    """Median ms per decode step, unconstrained and under ``SCHEMA``, interleaved ``rounds`` times (so
    drift in the machine's load hits both alike), with the one-time costs."""
    tokenizer = Tokenizer.from_pretrained(folder)
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
        for _ in range(rounds):
            free += run(model, prompt, steps, lambda _: None)
            bound += run(model, prompt, steps, constrained)
    free_ms, bound_ms = 1000 * statistics.median(free), 1000 * statistics.median(bound)
    return {"unconstrained_ms": free_ms, "json_schema_ms": bound_ms, "ratio": bound_ms / free_ms,
            "steps": len(free), "vocabulary_table_s": table_s, "schema_compile_ms": 1000 * compile_s}


def table_lines(row: dict) -> list[str]:
    return ["| decode step, batch 1 | unconstrained | json_schema | ratio |", "|---|---:|---:|---:|",
            f"| ms/step (median of {row['steps']}) | {row['unconstrained_ms']:.1f} | {row['json_schema_ms']:.1f} | "
            f"{row['ratio']:.3f} |",
            f"one-time: llguidance vocabulary table {row['vocabulary_table_s']:.2f} s, schema compile "
            f"{row['schema_compile_ms']:.1f} ms"]


def main() -> None:
    from .. import JanusForConditionalGeneration
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = JanusForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    print(f"torch threads {torch.get_num_threads()}")
    print("\n".join(table_lines(constrained_decode_row(model, args.model, args.steps, args.rounds))))


if __name__ == "__main__":
    main()
