"""PNG plots of the result rows (see :mod:`multihead.benchmark.report`), drawn with matplotlib.

- ``speedup.png``: ours time / torch time against L, one line per mode (the ratio the tables
  show: below 1, ours is faster).
- ``memory.png``: peak MiB a call adds against L, ours (solid line, filled markers) and torch
  (dashed line, hollow markers), per mode.

Colour is the mode. Points are joined only within one ``(N, E, H)`` family, whose marker says
which it is: a line from the seed shape to ``N1 E512`` would suggest a trend that is not there.
Both axes of both plots are logarithmic, and their labels say so. Every plot, ``decode.png``
too, carries a footer naming the machine, torch and the date (:func:`footer`).

Needs matplotlib (the ``bench`` extra: ``pip install 'multihead[bench]'``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from .cases import MODES

BENCH_EXTRA_HINT = "pip install 'multihead[bench]'"
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


def _draw(ax, rows, key, families, *, linestyle="-") -> None:
    for mode in MODES:
        for family, marker in families.items():
            lengths, values = _series(rows, mode, family, key)
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


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window).

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message names the extra.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "matplotlib":
            raise  # matplotlib is there but something it needs is not: its own message says what
        raise ModuleNotFoundError(
            f"the benchmark's plots need matplotlib, which is not installed: {BENCH_EXTRA_HINT}",
            name="matplotlib",
        ) from error
    return plt


def caption(machine: dict, setting: str = "") -> str:
    """The footer text: CPU and cores, device (and GPU), torch, fp32, ``setting``, date.

    Facts missing from ``machine`` are left out.
    """
    cpu = machine.get("cpu") or "unknown CPU"
    if machine.get("cpu_count"):
        cpu += f" ({machine['cpu_count']} cores)"
    parts = [cpu]
    if machine.get("device"):
        gpu = machine.get("gpu")
        parts.append(f"{machine['device']} {gpu}".strip() if gpu else machine["device"])
    if machine.get("torch_version"):
        parts.append(f"torch {machine['torch_version']}")
    parts.append("fp32")
    if setting:
        parts.append(setting)
    if machine.get("date"):
        parts.append(str(machine["date"]))
    return ", ".join(parts) + "."


def footer(fig, text: str) -> None:
    """Writes ``text`` under the plot, small (saved with ``bbox_inches="tight"`` it stays in)."""
    fig.text(0.01, -0.01, textwrap.fill(text, 120), fontsize="x-small", va="top")


def _finish(fig, ax, text: str, y_base: int) -> None:
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
    footer(fig, text)
    fig.tight_layout()


def speedup_figure(rows: Sequence[dict], machine: dict):
    """The figure of ``speedup.png``: ours time / torch time against L (see the module)."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    rows = [row for row in rows if row.get("L")]
    families = _families(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    _draw(ax, rows, "ours_over_torch", families)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("sequence length L (log2 scale)")
    ax.set_ylabel("ours/torch time (< 1: ours faster; log2 scale)")
    ax.set_title("multihead time / torch.nn.MultiheadAttention time (median of per-round ratios)")
    parity = Line2D([], [], color="black", linestyle="--", linewidth=1, label="parity (1)")
    _legend(ax, rows, families, [parity])
    _finish(fig, ax, caption(machine, "batch_first self-attention"), y_base=2)
    return fig


def memory_figure(rows: Sequence[dict], machine: dict):
    """The figure of ``memory.png``: peak MiB one call adds against L, ours and torch."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    rows = [row for row in rows if row.get("L")]
    families = _families(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    _draw(ax, rows, "ours_mib", families)
    _draw(ax, rows, "torch_mib", families, linestyle="--")
    ax.set_xlabel("sequence length L (log2 scale)")
    ax.set_ylabel("peak memory one call adds (MiB, log10 scale)")
    ax.set_title("Peak memory per call: multihead vs torch.nn.MultiheadAttention")
    styles = [
        Line2D(
            [], [], color="gray", linestyle="-", marker="o", label="ours: solid, filled markers"
        ),
        Line2D(
            [],
            [],
            color="gray",
            linestyle="--",
            marker="o",
            markerfacecolor="white",
            label="torch: dashed, hollow markers",
        ),
    ]
    _legend(ax, rows, families, styles)
    _finish(fig, ax, caption(machine, "batch_first self-attention"), y_base=10)
    return fig


def write_plots(rows: Sequence[dict], machine: dict, out_dir: Path) -> list[Path]:
    """Writes ``speedup.png`` and ``memory.png`` into ``out_dir`` (created when missing).

    Args:
        rows: result rows with ``mode``, ``N``, ``L``, ``E``, ``H`` and the timing / memory
            keys of :data:`multihead.benchmark.report.COLUMNS`.
        machine: the machine facts (CPU, device, torch version and date go into the footer).
        out_dir: the output directory.

    Returns:
        The paths written.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message names the extra.
    """
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in (("speedup.png", speedup_figure), ("memory.png", memory_figure)):
        fig = build(rows, machine)
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
