"""The eager floor of the default call: a minimal eager implementation of the same math, timed
against ours and torch's, interleaved in one process.

Run as ``python -m multihead.benchmark.floor [--budget S] [N:L ...]`` (default: the seed
shape N2 L5 E16 H4, and N16 L256, N1 L512, N1 L1024 at E512 H8). Each case is the
``infer_weights`` call of the benchmark (``batch_first``, eval, ``torch.no_grad()``, averaged
weights), where torch runs its native C++ kernel ``torch._native_multi_head_attention``.

The minimal implementation is one packed in-projection GEMM, one copy of q, k and v into
``(N * H, L, D)``, ``bmm``, softmax, ``bmm``, the head mean and the out-projection GEMM: the
fewest eager ops that compute the call. Its time is what Python eager code can reach; when it
is above torch's, a target below torch's time is below the floor.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cases import SEED_SHAPE, Case
from .cli import positive_seconds
from .timing import interleaved, median_ratio
from .workload import build_input, build_layers, make_calls

DEFAULT_CASES = [SEED_SHAPE[:2], (16, 256), (1, 512), (1, 1024)]


def minimal_call(layer: nn.Module, x: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    """The default call of ``layer`` (batch_first, self-attention) in the fewest eager ops."""
    weight, bias = layer.in_proj_weight.detach(), layer.in_proj_bias.detach()
    out_weight, out_bias = layer.out_proj.weight.detach(), layer.out_proj.bias.detach()
    heads = layer.num_heads
    batch, length, embed = x.shape
    head_dim = embed // heads
    scale = head_dim**-0.5

    def call() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            qkv = F.linear(x, weight, bias).view(batch, length, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, length, head_dim)
            probs = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
            out = torch.bmm(probs, v).view(batch, heads, length, head_dim)
            out = F.linear(out.transpose(1, 2).flatten(2), out_weight, out_bias)
            return out, probs.view(batch, heads, length, length).mean(dim=1)

    return call


def run(cases: list[tuple[int, int]], budget_s: float = 8.0) -> list[dict]:
    """One row per ``(N, L)``: medians (ms) of ours, torch and minimal, and their ratios."""
    rows = []
    for batch, length in cases:
        embed, heads = (SEED_SHAPE[2], SEED_SHAPE[3]) if length == SEED_SHAPE[1] else (512, 8)
        case = Case("infer_weights", batch, length, embed, heads)
        ours, theirs = build_layers(case, torch.device("cpu"))
        x = build_input(case, torch.device("cpu"))
        calls = dict(make_calls(case, {"ours": ours, "torch": theirs}, x, ("ours", "torch")))
        calls["minimal"] = minimal_call(ours, x)
        with torch.no_grad():  # the floor must compute the same call
            torch.testing.assert_close(calls["minimal"]()[0], calls["ours"](), atol=1e-5, rtol=1e-5)
        samples = interleaved(calls, budget_s=budget_s, min_rounds=5, max_rounds=300)
        row = {"case": case.name}
        row.update({f"{name}_ms": statistics.median(s) * 1e3 for name, s in samples.items()})
        row["ours_over_torch"] = median_ratio(samples["ours"], samples["torch"])
        row["minimal_over_torch"] = median_ratio(samples["minimal"], samples["torch"])
        row["ours_over_minimal"] = median_ratio(samples["ours"], samples["minimal"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| case | ours ms | torch ms | minimal ms | ours/torch | minimal/torch | ours/minimal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['ours_ms']:.4g} | {r['torch_ms']:.4g} | {r['minimal_ms']:.4g} "
            f"| {r['ours_over_torch']:.2f} | {r['minimal_over_torch']:.2f} "
            f"| {r['ours_over_minimal']:.2f} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(part) for part in text.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected N:L (two integers), got {text!r}") from error
    if batch <= 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"expected positive N and L, got {text!r}")
    return batch, length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.floor",
        description="The default call against a minimal eager implementation and torch.",
    )
    parser.add_argument("cases", nargs="*", type=_shape, help="N:L pairs (E512 H8; L5: E16 H4)")
    parser.add_argument("--budget", type=positive_seconds, default=8.0, help="seconds per case")
    args = parser.parse_args(argv)
    print(table(run(args.cases or DEFAULT_CASES, args.budget)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
