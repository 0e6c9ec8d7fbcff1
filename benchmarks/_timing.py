"""Timing helpers: interleaved repeats, medians with min and max, and ratios paired by round.

Configurations are timed in rounds: every round runs each configuration once, in a fresh random order, so a burst of
load from another process hits all of them alike. The ratio of a configuration to the baseline is the median over
rounds of (its time / the baseline's time in the same round), which cancels slow drifts that a ratio of medians
would keep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple


class Summary(NamedTuple):
    """Seconds: the median, min and max over the timed repeats, and how many there were."""

    median: float
    min: float
    max: float
    repeats: int


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def summarize(samples: list[float]) -> Summary:
    return Summary(median(samples), min(samples), max(samples), len(samples))


def interleaved(
    runners: Mapping[str, Callable[[], None]], *, repeats: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Run every runner ``warmup`` times untimed, then ``repeats`` timed rounds in shuffled order.

    Each runner must run one step and wait for its result (``block_until_ready``), so the wall time is the step's.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    order = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def paired_ratio(samples: list[float], baseline: list[float]) -> float:
    """The median over rounds of ``samples[i] / baseline[i]``."""
    return median([s / b for s, b in zip(samples, baseline)])
