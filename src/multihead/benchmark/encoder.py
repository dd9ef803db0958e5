"""torch's fused encoder kernel on our plain layer, against our layer declining it.

Shape legend: N batch, L sequence length, E embed dim, H heads.

``nn.TransformerEncoder`` in inference (eval, no_grad, batch_first) runs each layer through
torch's fused ``_transformer_encoder_layer_fwd`` kernel, reading the attention's parameters
instead of calling it, unless a module inside the layer has forward hooks; and it turns a
padded batch into a nested tensor. Our layer carries a no-op pre-hook ("declined", the shipped
choice): every attention runs our forward (nested batches sequence by sequence), and torch runs
the rest of the layer unfused. "fused" removes that hook for the measurement, so our plain
layer is treated as torch's own is. Both run in one process, interleaved round by round; the
ratio is declined / fused (above 1: declining is slower).

Run: ``python -m multihead.benchmark.encoder [--out DIR]`` (writes encoder.md / .json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from .. import swap
from ..layer import _declines_fused_encoder_kernel
from .cli import LOCAL_OUT, PUBLISHED_OUT, output_dir, positive_seconds
from .machine import gemm_gflops, machine_info
from .timing import interleaved, median_ratio

# (N, L, E, H, layers, padded): BERT-like batches, one short sequence and two long ones, with
# and without a key padding mask (which makes torch's encoder use nested tensors).
CASES = [
    (16, 128, 512, 8, 2, False),
    (16, 128, 512, 8, 2, True),
    (64, 64, 256, 4, 2, False),
    (64, 64, 256, 4, 2, True),
    (1, 128, 512, 8, 2, False),
    (2, 1024, 512, 8, 2, False),
    (2, 1024, 512, 8, 2, True),
]


@contextlib.contextmanager
def _fused(model: nn.Module):
    """Our layers inside ``model`` without the pre-hook that declines torch's fused kernel,
    as torch's own layers are."""
    removed = []
    for module in model.modules():  # the hook sits on each of our layers' out_proj
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _declines_fused_encoder_kernel:
                removed.append((module, key, module._forward_pre_hooks.pop(key)))
    try:
        yield
    finally:
        for module, key, hook in removed:
            module._forward_pre_hooks[key] = hook


def run(budget_s: float = 6.0) -> list[dict]:
    """Times every case both ways; returns one row per case (milliseconds and the ratio)."""
    rows = []
    for n, length, embed, heads, layers, padded in CASES:
        torch.manual_seed(0)
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(embed, heads, 4 * embed, dropout=0.0, batch_first=True),
            num_layers=layers,
        ).eval()
        swap(encoder)
        x = torch.randn(n, length, embed)
        mask = None
        if padded:  # lengths spread from L down to L / 4
            lengths = torch.linspace(length, length // 4, n).long()
            mask = torch.arange(length)[None, :] >= lengths[:, None]

        def fused(encoder=encoder, x=x, mask=mask):
            with torch.no_grad(), _fused(encoder):
                return encoder(x, src_key_padding_mask=mask)

        def declined(encoder=encoder, x=x, mask=mask):
            with torch.no_grad():
                return encoder(x, src_key_padding_mask=mask)

        samples = interleaved({"fused": fused, "declined": declined}, budget_s=budget_s)
        rows.append(
            dict(
                N=n,
                L=length,
                E=embed,
                H=heads,
                layers=layers,
                padded=padded,
                fused_ms=statistics.median(samples["fused"]) * 1e3,
                declined_ms=statistics.median(samples["declined"]) * 1e3,
                declined_over_fused=median_ratio(samples["declined"], samples["fused"]),
                max_abs_difference=float((fused() - declined()).abs().max()),
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| N | L | E | H | layers | padding mask | fused ms | declined ms | declined / fused "
        "| max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['L']} | {r['E']} | {r['H']} | {r['layers']} | "
            f"{'yes' if r['padded'] else 'no'} | {r['fused_ms']:.1f} | {r['declined_ms']:.1f} | "
            f"{r['declined_over_fused']:.2f} | {r['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines)


def write(rows: list[dict], out: Path) -> list[Path]:
    """Writes ``encoder.json`` (rows and machine) and ``encoder.md`` (the table) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(torch.device("cpu"), gemm_gflops(torch.device("cpu")))
    header = (
        f"{machine['cpu']}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch_version']}, "
        f"{machine['date']}; fp32, eval + no_grad; declined / fused below 1: declining is faster"
    )
    json_path, md_path = out / "encoder.json", out / "encoder.md"
    json_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    md_path.write_text(
        f"# torch's fused encoder kernel against our layer declining it\n\n"
        f"{header}\n\n{markdown(rows)}\n"
    )
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> int:
    """``python -m multihead.benchmark.encoder [--out DIR] [--budget SECONDS]``."""
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.encoder",
        description="Times a swapped nn.TransformerEncoder with torch's fused encoder kernel "
        "against our layer declining it (the shipped choice).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=LOCAL_OUT,
        help=f"folder for encoder.md and encoder.json (default: {LOCAL_OUT}, git-ignored; "
        f"{PUBLISHED_OUT} is what the README quotes)",
    )
    parser.add_argument(
        "--budget", type=positive_seconds, default=6.0, help="seconds of rounds per case"
    )
    args = parser.parse_args(argv)
    # The folder is checked before the minutes of timing, as the bench command does.
    out, problem = output_dir(argparse.Namespace(out=args.out, publish=False))
    if problem is not None:
        parser.error(problem)
    rows = run(budget_s=args.budget)
    print(markdown(rows))
    print("wrote " + ", ".join(str(p) for p in write(rows, out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
