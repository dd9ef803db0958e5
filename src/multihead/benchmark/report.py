"""Result tables: ``results.md``, ``results.json`` and ``results.csv``, one row per case.

A result row is a flat dict with the keys in ``COLUMNS`` (missing ones are empty: a skipped
implementation, a mode without ORT, a run without memory) followed by the ``MACHINE`` keys,
so each row says where it was measured.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

COLUMNS = (
    "mode",
    "N",
    "L",
    "E",
    "H",
    "rounds",
    "ours_ms",
    "torch_ms",
    "ours_over_torch",
    "ours_gflops",
    "ours_pct_gemm",
    "ours_mib",
    "torch_mib",
    "mem_ours_over_torch",
    "ort_ms",
    "ours_over_ort",
    "ort_layer",
    "bool_mask_over_is_causal",
    "float_mask_over_is_causal",
    "flops",
    "note",
)
MACHINE = (
    "cpu",
    "cpu_count",
    "torch_threads",
    "torch_version",
    "python_version",
    "device",
    "gpu",
    "gemm_gflops",
    "date",
)

# results.md: (header, key, number format); a ratio below 1 means ours is faster or smaller.
_TABLE = (
    ("mode", "mode", None),
    ("N", "N", None),
    ("L", "L", None),
    ("E", "E", None),
    ("H", "H", None),
    ("rounds", "rounds", None),
    ("ours ms", "ours_ms", "ms"),
    ("torch ms", "torch_ms", "ms"),
    ("ours/torch", "ours_over_torch", "ratio"),
    ("ours GFLOP/s", "ours_gflops", "int"),
    ("% GEMM", "ours_pct_gemm", "int"),
    ("ours MiB", "ours_mib", "mib"),
    ("torch MiB", "torch_mib", "mib"),
    ("mem ours/torch", "mem_ours_over_torch", "ratio"),
    ("ORT ms", "ort_ms", "ms"),
    ("ours/ORT", "ours_over_ort", "ratio"),
    ("bool mask/is_causal", "bool_mask_over_is_causal", "ratio"),
    ("float mask/is_causal", "float_mask_over_is_causal", "ratio"),
)

_LEGEND = """\
Times are medians over interleaved rounds (the order rotates each round); the ratios are the
medians of the per-round ratios, so ours/torch < 1 means ours is faster. Memory is the peak
a single call adds (fresh process per case and implementation; CPU: resident set, CUDA:
allocated memory). GFLOP/s is ours; % GEMM is that over the fp32 GEMM throughput above.
Causal: torch gets a float mask with is_causal=True, ours is_causal=True alone; the last two
columns time ours given the causal pattern as a bool or float attn_mask instead, over ours with
is_causal (target <= 1.2). ORT: our layer exported with torch.onnx.export(dynamo=True) and run
by onnxruntime's CPU provider (when ours fails to export, torch's layer is exported instead
and the row's note says so)."""


def _format(value: object, kind: str | None) -> str:
    if value is None or value == "":
        return "-"
    if kind is None:
        return str(value)
    number = float(value)
    if kind == "ratio":
        return f"{number:.2f}"
    if kind == "int":
        return f"{number:.0f}" if number >= 10 else f"{number:.2g}"
    if kind == "mib":
        return f"{number:.1f}" if number < 10 else f"{number:.0f}"
    # milliseconds: three significant digits, no exponent
    if number >= 100:
        return f"{number:.0f}"
    if number >= 10:
        return f"{number:.1f}"
    return f"{number:.3g}" if number >= 0.01 else f"{number:.4f}"


def markdown(rows: Sequence[dict], machine: dict) -> str:
    """The Markdown report: machine facts, the table, the legend and the notes."""
    lines = [
        "# multihead vs torch.nn.MultiheadAttention",
        "",
        f"- CPU: {machine.get('cpu')} ({machine.get('cpu_count')} cores, "
        f"torch threads {machine.get('torch_threads')})",
        f"- device: {machine.get('device')} {machine.get('gpu') or ''}".rstrip(),
        f"- torch {machine.get('torch_version')}, Python {machine.get('python_version')}",
        f"- fp32 GEMM (torch.mm 2048x2048, best run): {machine.get('gemm_gflops')} GFLOP/s",
        f"- date: {machine.get('date')}",
        "",
        "| " + " | ".join(header for header, _, _ in _TABLE) + " |",
        "|" + "|".join("---" if kind is None else "---:" for _, _, kind in _TABLE) + "|",
    ]
    for row in rows:
        cells = (_format(row.get(key), kind) for _, key, kind in _TABLE)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _LEGEND]
    notes = [
        f"- {row['mode']} N{row['N']} L{row['L']} E{row['E']} H{row['H']}: {row['note']}"
        for row in rows
        if row.get("note")
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], machine: dict, out_dir: Path) -> list[Path]:
    """Writes ``results.md``, ``results.json`` and ``results.csv`` into ``out_dir``.

    Args:
        rows: result rows (see the module docstring); keys outside ``COLUMNS`` are ignored.
        machine: the machine facts, copied into every row of the JSON and CSV files.
        out_dir: created when missing.

    Returns:
        The paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    full_rows = [
        {**{key: row.get(key) for key in COLUMNS}, **{key: machine.get(key) for key in MACHINE}}
        for row in rows
    ]
    md_path, json_path, csv_path = (out_dir / f"results.{ext}" for ext in ("md", "json", "csv"))
    md_path.write_text(markdown(rows, machine))
    json_path.write_text(json.dumps({"machine": machine, "results": full_rows}, indent=2) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *MACHINE])
        writer.writeheader()
        for row in full_rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return [md_path, json_path, csv_path]
