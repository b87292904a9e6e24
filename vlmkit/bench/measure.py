"""Timing helpers: alternating runs with medians, per-step decode timing, the machine's memory-read
bandwidth, and peak resident memory of a child process."""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def alternate(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each run in turn (A B A B ...), ``warmup`` untimed rounds first; each run returns its own
    measurement. Alternating spreads drifting machine load over both engines alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return samples


def alternate_with_bandwidth(runs: dict[str, Callable[[], float]], measure_bandwidth: Callable[[], float],
                             repeats: int, warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``alternate``, with the memory bandwidth measured just before and just after each timed call; also
    returns, per run, the mean of the two for each call. On a shared VM the bandwidth moves by half within
    minutes, so a run's bound takes the bandwidth around that run, not one measured a run away."""
    alternate(runs, 0, warmup)
    bandwidths: dict[str, list[float]] = {name: [] for name in runs}

    def bracketed(name: str, run: Callable[[], float]) -> Callable[[], float]:
        def call() -> float:
            before = measure_bandwidth()
            value = run()
            bandwidths[name].append((before + measure_bandwidth()) / 2)
            return value
        return call

    return alternate({name: bracketed(name, run) for name, run in runs.items()}, repeats, warmup=0), bandwidths


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


class StepTimer:
    """A generate() streamer that only records when each new token arrives.

    transformers first puts the prompt, then one tensor per step; vlmkit puts one tensor per step. The
    time between consecutive new tokens is one decode step (forward pass plus token selection)."""

    def __init__(self, skip_first_put: bool):
        self.skip_first_put = skip_first_put
        self.times: list[float] = []
        self._puts = 0

    def put(self, tokens) -> None:
        self._puts += 1
        if self.skip_first_put and self._puts == 1:
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def memory_bandwidth_gb_s(gib: float = 1.0, repeats: int = 9) -> float:
    """Memory-read bandwidth with torch's current thread count: the median of ``repeats`` sums of a float32
    tensor far larger than the caches, of random values (a VM may back identical pages, such as a tensor
    of ones, by shared memory). The median, not the best: on a shared VM single sums have come out at
    twice what the memory can do. The tensor is made once per size and kept."""
    data = _bandwidth_tensor(gib)
    return data.numel() * 4 / median([timed(data.sum) for _ in range(repeats)]) / 1e9


@functools.lru_cache(maxsize=1)
def _bandwidth_tensor(gib: float) -> torch.Tensor:
    data = torch.rand(int(gib * 1024**3) // 4)
    data.sum()
    return data


def pct_of_bound(weight_bytes: int, bandwidths_gb_s: list[float], step_seconds: list[float]) -> float:
    """The median over rounds of (bandwidth bound / step time) in %, each round's bound from the bandwidth
    measured around that round's run (``alternate_with_bandwidth``)."""
    return median([100 * weight_bytes / (bandwidth * 1e9) / seconds
                   for bandwidth, seconds in zip(bandwidths_gb_s, step_seconds)])


def peak_rss_in_child(argv: list[str], timeout: float = 1800) -> dict:
    """Run ``python -m vlmkit.bench <argv>`` (a probe that loads one engine and answers one question)
    and return the JSON it prints last, which carries its peak RSS."""
    result = subprocess.run([sys.executable, "-m", "vlmkit.bench", *argv], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB: VmHWM of its address space. (Not getrusage's
    ru_maxrss, which Linux carries over from the parent through fork and exec.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
