"""Interleaved timing: implementations take turns in one process, and each round gives a ratio.

Timing two implementations one after the other lets the machine's state drift between them
(frequency, other processes, cache and allocator state). Interleaving them round by round, with
the order rotating, and taking the median of the per-round ratios, cancels most of that drift.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

# A sample repeats a fast call until it takes at least this long, so that timer resolution and
# call-to-call jitter do not dominate the tiny cases.
MIN_SAMPLE_S = 2e-3


def _no_sync() -> None:
    pass


def time_call(call: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``call``, averaged over ``repeats`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - start) / repeats


def choose_rounds(round_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many rounds of ``round_s`` seconds fit in ``budget_s``, within the bounds."""
    fitting = int(budget_s / round_s) if round_s > 0 else max_rounds
    return max(min_rounds, min(max_rounds, fitting))


def interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 300,
    sync: Callable[[], None] = _no_sync,
) -> dict[str, list[float]]:
    """Times ``calls`` in interleaved rounds and returns each one's seconds per call, by round.

    Every call runs once to warm up and once more to estimate its time; fast calls are then
    repeated within a sample (see ``MIN_SAMPLE_S``). The number of rounds is what fits in
    ``budget_s``, clamped to ``[min_rounds, max_rounds]``. Round ``r`` starts with call
    ``r mod len(calls)``, so each one goes first equally often.

    Args:
        calls: zero-argument callables by name.
        budget_s: seconds to spend on the timed rounds (at least ``min_rounds`` are run).
        min_rounds, max_rounds: bounds on the number of rounds.
        sync: waits for queued device work (``torch.cuda.synchronize`` on CUDA).

    Returns:
        ``{name: [seconds per call in round 0, round 1, ...]}``.
    """
    names = list(calls)
    for name in names:
        time_call(calls[name], 1, sync)
    estimate = {name: time_call(calls[name], 1, sync) for name in names}
    repeats = {name: max(1, math.ceil(MIN_SAMPLE_S / max(estimate[name], 1e-9))) for name in names}
    round_s = sum(estimate[name] * repeats[name] for name in names)
    rounds = choose_rounds(round_s, budget_s, min_rounds, max_rounds)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            samples[name].append(time_call(calls[name], repeats[name], sync))
    return samples


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-round ratios ``numerators[r] / denominators[r]``."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(
            "Expected two equally long, non-empty sequences of per-round times. "
            f"Received: lengths {len(numerators)} and {len(denominators)}"
        )
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))
