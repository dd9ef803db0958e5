"""PNG plots of the result rows (see :mod:`multihead.benchmark.report`), drawn with matplotlib.

- ``speedup.png``: torch time / ours time against L, one line per mode.
- ``memory.png``: peak MiB a call adds against L, ours and torch, per mode.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from .cases import MODES

_COLORS = {"infer": "C0", "infer_weights": "C1", "train": "C2", "causal": "C3"}


def _series(rows: Sequence[dict], mode: str, key: str) -> tuple[list[int], list[float]]:
    """(L, value) of ``mode``'s rows that have ``key``, sorted by L."""
    points = sorted(
        (row["L"], float(row[key])) for row in rows if row["mode"] == mode and row.get(key)
    )
    return [length for length, _ in points], [value for _, value in points]


def _shapes_caption(rows: Sequence[dict]) -> str:
    shapes = sorted({(row["L"], row["N"], row["E"], row["H"]) for row in rows})
    return ", ".join(f"L{length}: N{n} E{e} H{h}" for length, n, e, h in shapes)


def _finish(fig, ax, path: Path, caption: str) -> None:
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.text(0.01, -0.02, textwrap.fill(caption, 110), fontsize="x-small", va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_plots(rows: Sequence[dict], machine: dict, out_dir: Path) -> list[Path]:
    """Writes ``speedup.png`` and ``memory.png`` into ``out_dir`` (created when missing).

    Args:
        rows: result rows with ``mode``, ``N``, ``L``, ``E``, ``H`` and the timing / memory
            keys of :data:`multihead.benchmark.report.COLUMNS`.
        machine: the machine facts (its CPU and torch version go into the titles).
        out_dir: the output directory.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    where = f"{machine.get('cpu')}, {machine.get('device')}, torch {machine.get('torch_version')}"
    caption = "Shapes: " + _shapes_caption(rows) + f". Machine: {where}."

    speedup_path = out_dir / "speedup.png"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for mode in MODES:
        lengths, ratios = _series(rows, mode, "ours_over_torch")
        if lengths:
            speedups = [1.0 / ratio for ratio in ratios]
            ax.plot(lengths, speedups, marker="o", color=_COLORS[mode], label=mode)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="parity")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("sequence length L (log2)")
    ax.set_ylabel("torch time / ours time (>1: ours faster)")
    ax.set_title("multihead speedup over torch.nn.MultiheadAttention (fp32, self-attention)")
    _finish(fig, ax, speedup_path, caption)
    plt.close(fig)

    memory_path = out_dir / "memory.png"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for mode in MODES:
        for key, style, who in (("ours_mib", "-", "ours"), ("torch_mib", "--", "torch")):
            lengths, mib = _series(rows, mode, key)
            if lengths:
                ax.plot(
                    lengths,
                    mib,
                    linestyle=style,
                    marker="o" if who == "ours" else "s",
                    color=_COLORS[mode],
                    label=f"{mode} ({who})",
                )
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (log2)")
    ax.set_ylabel("peak memory one call adds (MiB, log)")
    ax.set_title("Peak memory per call: multihead (solid) vs torch (dashed)")
    _finish(fig, ax, memory_path, caption)
    plt.close(fig)
    return [speedup_path, memory_path]
