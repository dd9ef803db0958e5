"""PNG plots of the result rows (see :mod:`multihead.benchmark.report`), drawn with matplotlib.

- ``speedup.png``: torch time / ours time against L, one line per mode.
- ``memory.png``: peak MiB a call adds against L, ours (solid) and torch (dashed), per mode.

Colour is the mode. Points are joined only within one ``(N, E, H)`` family, whose marker says
which it is: a line from the seed shape to ``N1 E512`` would suggest a trend that is not there.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from .cases import MODES

_COLORS = {"infer": "C0", "infer_weights": "C1", "train": "C2", "causal": "C3"}
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _families(rows: Sequence[dict]) -> dict[tuple[int, int, int], str]:
    """A marker per ``(N, E, H)`` family, the largest family first."""
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        family = (row["N"], row["E"], row["H"])
        counts[family] = counts.get(family, 0) + 1
    ordered = sorted(counts, key=lambda family: (-counts[family], family))
    return {family: _MARKERS[i % len(_MARKERS)] for i, family in enumerate(ordered)}


def _series(
    rows: Sequence[dict], mode: str, family: tuple[int, int, int], key: str
) -> tuple[list[int], list[float]]:
    """(L, value) of the rows of ``mode`` and ``family`` that have ``key``, sorted by L."""
    points = sorted(
        (row["L"], float(row[key]))
        for row in rows
        if row["mode"] == mode and (row["N"], row["E"], row["H"]) == family and row.get(key)
    )
    return [length for length, _ in points], [value for _, value in points]


def _draw(ax, rows, key, families, *, linestyle="-", invert=False) -> None:
    for mode in MODES:
        for family, marker in families.items():
            lengths, values = _series(rows, mode, family, key)
            if invert:
                values = [1.0 / value for value in values]
            if lengths:
                ax.plot(
                    lengths,
                    values,
                    linestyle=linestyle,
                    marker=marker,
                    color=_COLORS[mode],
                    markerfacecolor="white" if linestyle != "-" else _COLORS[mode],
                )


def _legend(ax, rows, families, extra=()) -> None:
    from matplotlib.lines import Line2D

    present = [mode for mode in MODES if any(row["mode"] == mode for row in rows)]
    handles = [Line2D([], [], color=_COLORS[mode], label=mode) for mode in present]
    handles += [
        Line2D([], [], color="gray", marker=marker, linestyle="", label=f"N{n} E{e} H{h}")
        for (n, e, h), marker in families.items()
    ]
    handles += list(extra)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")


def _tick_label(value: float, _: int) -> str:
    """``2000``, ``1.5``, ``0.0312``: whole numbers in full, others to 3 significant digits."""
    return f"{value:.0f}" if value >= 1 and value == round(value) else f"{value:.3g}"


def _finish(fig, ax, path: Path, caption: str, y_base: int) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=y_base)
    # Ticks between the powers too when the data span little (a quick run often does).
    low, high = ax.get_ylim()
    narrow = high / low < (8 if y_base == 2 else 10_000)
    subs = ((1.0, 1.5) if y_base == 2 else (1.0, 2.0, 5.0)) if narrow else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=y_base, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.grid(True, which="major", alpha=0.3)
    fig.text(0.01, -0.01, textwrap.fill(caption, 120), fontsize="x-small", va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_plots(rows: Sequence[dict], machine: dict, out_dir: Path) -> list[Path]:
    """Writes ``speedup.png`` and ``memory.png`` into ``out_dir`` (created when missing).

    Args:
        rows: result rows with ``mode``, ``N``, ``L``, ``E``, ``H`` and the timing / memory
            keys of :data:`multihead.benchmark.report.COLUMNS`.
        machine: the machine facts (CPU, device and torch version go into the caption).
        out_dir: the output directory.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for row in rows if row.get("L")]
    families = _families(rows)
    caption = (
        f"{machine.get('cpu')} ({machine.get('cpu_count')} cores), {machine.get('device')}, "
        f"torch {machine.get('torch_version')}, fp32, batch_first self-attention, "
        f"{machine.get('date')}."
    )

    speedup_path = out_dir / "speedup.png"
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    _draw(ax, rows, "ours_over_torch", families, invert=True)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("sequence length L (log2 scale)")
    ax.set_ylabel("torch time / ours time (> 1: ours faster)")
    ax.set_title("multihead speedup over torch.nn.MultiheadAttention")
    parity = Line2D([], [], color="black", linestyle="--", linewidth=1, label="parity")
    _legend(ax, rows, families, [parity])
    _finish(fig, ax, speedup_path, caption, y_base=2)
    plt.close(fig)

    memory_path = out_dir / "memory.png"
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    _draw(ax, rows, "ours_mib", families)
    _draw(ax, rows, "torch_mib", families, linestyle="--")
    ax.set_xlabel("sequence length L (log2 scale)")
    ax.set_ylabel("peak memory one call adds (MiB, log scale)")
    ax.set_title("Peak memory per call: multihead vs torch.nn.MultiheadAttention")
    styles = [
        Line2D([], [], color="gray", linestyle="-", label="ours"),
        Line2D([], [], color="gray", linestyle="--", label="torch"),
    ]
    _legend(ax, rows, families, styles)
    _finish(fig, ax, memory_path, caption, y_base=10)
    plt.close(fig)
    return [speedup_path, memory_path]
