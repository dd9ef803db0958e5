"""Where the default call's time goes, op by op, ours against torch (``torch.profiler``).

Run: ``python -m multihead.benchmark.profile [--calls K] [--top T] [--out FILE]``. For each
shape of the grid's default call (``layer(x, x, x)``: ``need_weights=True``, averaged weights)
in ``infer_weights`` and ``train`` modes, both layers (same weights, same input) run K calls
under the profiler, interleaved call by call; the table gives each op's self CPU time per call
(ms) for ours and torch, the ops sorted by the larger of the two, and the totals.

Profiles are for finding where time goes, not for ratios: the profiler adds its own cost per
op (which weighs most on small calls). Ratios come from ``python -m multihead bench``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import Case
from .workload import build_input, build_layers, make_calls

# The shapes the issue names: (N, L), E 512, H 8.
SHAPES = ((16, 256), (1, 512), (1, 1024))
MODES = ("infer_weights", "train")


def profile_case(case: Case, calls: int) -> dict[str, dict[str, float]]:
    """``{op: {"ours": ms per call, "torch": ms per call}}`` of self CPU time."""
    device = torch.device("cpu")
    ours, theirs = build_layers(case, device)
    x = build_input(case, device)
    run = make_calls(case, {"ours": ours, "torch": theirs}, x, ("ours", "torch"))
    for _ in range(2):  # warm-up
        run["ours"](), run["torch"]()
    per_op: dict[str, dict[str, float]] = defaultdict(lambda: {"ours": 0.0, "torch": 0.0})
    for name in ("ours", "torch"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run[name]()
        for event in prof.key_averages():
            per_op[event.key][name] += event.self_cpu_time_total / 1000.0 / calls
    return dict(per_op)


def table(case: Case, per_op: dict[str, dict[str, float]], top: int) -> str:
    rows = sorted(per_op.items(), key=lambda item: -max(item[1].values()))
    total = {name: sum(op[name] for op in per_op.values()) for name in ("ours", "torch")}
    lines = [
        f"### {case.mode}, N{case.batch} L{case.seq_len} E{case.embed_dim} H{case.num_heads}",
        "",
        "| op (self CPU) | ours ms/call | torch ms/call |",
        "| --- | ---: | ---: |",
    ]
    for op, times in rows[:top]:
        lines.append(f"| `{op}` | {times['ours']:.2f} | {times['torch']:.2f} |")
    lines.append(f"| **total** | **{total['ours']:.2f}** | **{total['torch']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multihead.benchmark.profile")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per layer")
    parser.add_argument("--top", type=int, default=10, help="ops shown per case")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    parts = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; self CPU time per "
        f"call, {args.calls} calls per layer\n"
    ]
    for mode in MODES:
        for batch, length in SHAPES:
            case = Case(mode, batch, length, 512, 8)
            parts.append(table(case, profile_case(case, args.calls), args.top))
            print(parts[-1], file=sys.stderr)
    if args.out is not None:
        args.out.write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
