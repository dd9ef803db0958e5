"""The cost of issue 12's options: a layer with ``sinks`` / ``output_gate`` / ``head_dim``
against the same layer without, interleaved in one process.

Run as ``python -m multihead.benchmark.variants [--budget S] [L ...]`` (default L 512 and
2048; N1 E512 H8, float32, causal). For each option and length it times four calls, inference
(``torch.no_grad()``) and training (forward and backward), each with ``need_weights`` False and
True, and prints the median over rounds of the per-round ratio ``option / plain`` (below 1:
the option's call is faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..layer import MultiheadAttention
from .cli import positive_seconds
from .timing import interleaved, median_ratio

EMBED, HEADS = 512, 8
OPTIONS = {
    "sinks": {"sinks": True},
    "output_gate": {"output_gate": True},
    "head_dim=128": {"head_dim": 128},  # 8 heads of 128 (E 512): twice the q/k/v width
}


def _call(layer: MultiheadAttention, x: torch.Tensor, train: bool, weights: bool) -> Callable:
    def infer() -> None:
        with torch.no_grad():
            layer(x, x, x, is_causal=True, need_weights=weights)

    def train_step() -> None:
        out, w = layer(x, x, x, is_causal=True, need_weights=weights)
        loss = out.sum() if w is None else out.sum() + w.sum()
        loss.backward()

    return train_step if train else infer


def run(lengths: list[int], budget_s: float) -> list[tuple[str, int, str, float]]:
    """Rows ``(option, L, call, ratio)``."""
    rows = []
    for length in lengths:
        x = torch.randn(1, length, EMBED)
        for name, kwargs in OPTIONS.items():
            torch.manual_seed(0)
            plain = MultiheadAttention(EMBED, HEADS, batch_first=True)
            torch.manual_seed(0)
            option = MultiheadAttention(EMBED, HEADS, batch_first=True, **kwargs)
            if option.sinks is not None:
                with torch.no_grad():
                    option.sinks.normal_()
            for train in (False, True):
                for weights in (False, True):
                    calls = {
                        "option": _call(option, x, train, weights),
                        "plain": _call(plain, x, train, weights),
                    }
                    times = interleaved(calls, budget_s=budget_s)
                    label = f"{'train' if train else 'infer'} weights={weights}"
                    rows.append(
                        (name, length, label, median_ratio(times["option"], times["plain"]))
                    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.variants",
        description="Issue 12's options against the same layer without them (time ratios).",
    )
    parser.add_argument("lengths", nargs="*", type=int, help="sequence lengths (N1 E512 H8)")
    parser.add_argument("--budget", type=positive_seconds, default=3.0, help="seconds per pair")
    args = parser.parse_args(argv)
    print(f"{'option':<14}{'L':>6}  {'call':<22}{'option / plain':>15}")
    for name, length, label, ratio in run(args.lengths or [512, 2048], args.budget):
        print(f"{name:<14}{length:>6}  {label:<22}{ratio:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
