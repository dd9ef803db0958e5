"""Attention heatmaps from the weights :class:`multihead.MultiheadAttention` returns.

Shape legend: H heads, L query length, S key length (including any ``add_bias_kv`` /
``add_zero_attn`` slots the layer appended).

``(L, S)`` draws one map; ``(1, H, L, S)`` (``average_attn_weights=False`` for one sequence)
draws a grid with one map per head on one shared colour scale. A 3-D tensor is ambiguous: the
layer returns ``(H, L, S)`` per-head weights for an unbatched call but ``(N, L, S)`` averaged
weights for a batch, so a 3-D tensor with more than one map needs ``panels`` to say what its
first axis is (``panels="head"``, ``"item"``, ``"layer"``, ...); the panels are titled with it.
A leading batch dimension of size 1 is dropped, so ``layer(x, x, x)[1]`` for one sequence can be
passed as it is. Rows are queries, columns keys: row i shows where query i looks.

Needs matplotlib (the ``plot`` extra: ``pip install 'multihead[plot]'``).
:func:`attention_figure` returns a pyplot figure (``figure.show()`` and ``plt.show()`` work; close
it with ``plt.close(figure)`` when drawing many); :func:`save_attention` draws without pyplot, so
no window opens and no global figure state is touched.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_EXTRA_HINT = "pip install 'multihead[plot]'"
# Formats matplotlib lists but that need more than matplotlib: pgf is LaTeX source and needs a
# TeX installation to write.
_UNSUPPORTED_FORMATS = frozenset({"pgf"})

# Inches per token along each axis of one map, and the bounds on one map's side (a long
# sequence gets smaller cells); the smallest label font, in points.
_CELL, _MIN_SIDE, _MAX_SIDE = 0.24, 1.8, 7.0
_MIN_FONT = 6.0


def _import_matplotlib(module: str = "matplotlib"):
    """Imports ``module`` (matplotlib or one of its submodules), naming the extra when missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "matplotlib":
            raise  # matplotlib is there but something it needs is not: its own message says what
        raise ModuleNotFoundError(
            f"multihead.plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}",
            name="matplotlib",
        ) from error


def image_formats() -> tuple[str, ...]:
    """The file suffixes (without the dot) :func:`save_attention` can write, e.g. png, jpg, pdf.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    backend_bases = _import_matplotlib("matplotlib.backend_bases")
    formats = backend_bases.FigureCanvasBase.get_supported_filetypes()
    return tuple(sorted(set(formats) - _UNSUPPORTED_FORMATS))


def image_format(path: str | Path, name: str = "path") -> str:
    """The format :func:`save_attention` writes ``path`` in: its suffix, or png without one.

    Raises:
        ValueError: a suffix matplotlib cannot write; the message names the argument ``name``.
        ModuleNotFoundError: matplotlib is not installed.
    """
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    formats = image_formats()
    if suffix not in formats:
        raise ValueError(
            f"Invalid argument `{name}`: expected a file name ending in one of "
            f"{', '.join('.' + f for f in formats)}. Received: {str(path)!r}."
        )
    return suffix


# Labels and titles are plain text: a token or sentence with "$" is not TeX math.
_PLAIN = {"parse_math": False}


def _side(query_len: int, key_len: int) -> float:
    """Inches along the longer side of one map."""
    return min(_MAX_SIDE, max(_MIN_SIDE, _CELL * max(query_len, key_len)))


def _as_maps(weights: Tensor, panels: str | None = None) -> tuple[Tensor, str | None]:
    """``weights`` as ``(P, L, S)`` float on CPU, and what the P panels are (None for one map).

    ``(L, S)``: one map. ``(1, H, L, S)``: H heads. ``(P, L, S)``: P maps of what ``panels``
    names, required when P > 1 (heads of one sequence and items of a batch look alike).
    """
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"Invalid argument `weights`: expected a tensor. Received: {type(weights).__name__}."
        )
    if panels is not None and (not isinstance(panels, str) or not panels.strip()):
        raise ValueError(
            "Invalid argument `panels`: expected what the first axis of `weights` is, "
            f"such as 'head' or 'item'. Received: {panels!r}."
        )
    shape = tuple(weights.shape)
    w = weights.detach().to("cpu", torch.float32)
    if w.numel() == 0:
        raise ValueError(
            "Invalid argument `weights`: expected a non-empty (L, S), (P, L, S) or (1, H, L, S) "
            f"tensor. Received: shape {shape}."
        )
    if w.dim() == 4 and w.shape[0] > 1:
        raise ValueError(
            f"Invalid argument `weights`: expected one sequence's maps, but the leading batch "
            f"dimension holds {shape[0]} items. Pass one item: weights[i : i + 1], or "
            f"weights[i] with panels='head'. Received: shape {shape}."
        )
    if w.dim() == 4:
        w, panels = w[0], panels or "head"  # (H, L, S) from a batch of one
    elif w.dim() == 2:
        w = w.unsqueeze(0)  # (1, L, S)
    if w.dim() != 3 or w.numel() == 0:
        raise ValueError(
            "Invalid argument `weights`: expected a non-empty (L, S), (P, L, S) or (1, H, L, S) "
            f"tensor. Received: shape {shape}."
        )
    if w.shape[0] > 1 and panels is None:
        raise ValueError(
            f"Invalid argument `weights`: a 3-D tensor of {shape[0]} maps is ambiguous: the "
            "layer returns (H, L, S) per-head weights for an unbatched call and (N, L, S) "
            "averaged weights for a batch. Pass one item's (L, S) map (weights[i]), per-head "
            "weights with their batch of one ((1, H, L, S), from average_attn_weights=False), "
            "or say what the first axis is: panels='head' (or 'item', 'layer', ...). "
            f"Received: shape {shape}."
        )
    return w, (panels.strip() if w.shape[0] > 1 else None)


def _token_list(name: str, labels: Sequence[str] | None) -> list[str] | None:
    """Labels as a list of strings, taken once (a generator or an array works; a bare string
    would be split into characters, so it is refused)."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(
            f"Invalid argument `{name}`: expected a sequence of labels, one per token. "
            f"Received: the string {labels!r}."
        )
    return [str(label) for label in labels]


def _labels(name: str, labels: Sequence[str] | None, size: int, axis: str) -> list[str] | None:
    labels = _token_list(name, labels)
    if labels is None:
        return None
    if len(labels) != size:
        raise ValueError(
            f"Invalid argument `{name}`: expected {size} labels ({axis}). "
            f"Received: {len(labels)} labels."
        )
    return labels


def _scale_top(w: Tensor) -> float:
    """The colour scale's top: the largest finite weight (NaN or inf cells would make the scale
    meaningless), or 1 when there is none above 0 (an all-zero map: fully masked rows)."""
    finite = w[torch.isfinite(w)]
    top = float(finite.max()) if finite.numel() else 0.0
    return top if top > 0 else 1.0


def heatmap(
    ax: Axes,
    weights: Tensor,
    *,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    vmax: float | None = None,
    title: str | None = None,
):
    """Draws one ``(L, S)`` map on ``ax`` and returns the image (for a colour bar).

    Args:
        ax: a matplotlib Axes.
        weights: ``(L, S)``.
        query_tokens, key_tokens: L row labels and S column labels, or None for indices.
        vmax: top of the colour scale (default the map's largest finite value); the bottom is
            0. Non-finite weights (NaN, inf) are drawn in red, outside the scale.
        title: drawn above the map.
    """
    w, _ = _as_maps(weights, "map")
    if w.shape[0] != 1:
        raise ValueError(
            "Invalid argument `weights`: expected one (L, S) map. "
            f"Received: shape {tuple(weights.shape)}."
        )
    w = w[0]
    query_len, key_len = w.shape
    rows = _labels("query_tokens", query_tokens, query_len, "one per query, L")
    cols = _labels("key_tokens", key_tokens, key_len, "one per key, S")
    cmap = _import_matplotlib().colormaps["viridis"].with_extremes(bad="red")
    image = ax.imshow(
        w.masked_fill(~torch.isfinite(w), float("nan")).numpy(),  # non-finite: the bad colour
        cmap=cmap,
        vmin=0.0,
        vmax=_scale_top(w) if vmax is None else vmax,
        aspect="equal",
        interpolation="nearest",
    )
    # Labels as tall as a cell allows, within readable bounds; past that, every k-th label.
    cell = _side(query_len, key_len) / max(query_len, key_len)  # inches per token
    fontsize = min(9.0, cell * 72 * 0.55)
    step = math.ceil(_MIN_FONT / fontsize) if fontsize < _MIN_FONT else 1
    fontsize = max(fontsize, _MIN_FONT)
    if rows is not None:
        ax.set_yticks(range(0, query_len, step), rows[::step], fontsize=fontsize, **_PLAIN)
    if cols is not None:
        ax.set_xticks(
            range(0, key_len, step), cols[::step], fontsize=fontsize, rotation=90, **_PLAIN
        )
    ax.tick_params(length=0, labelsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 1, **_PLAIN)
    return image


def attention_figure(
    weights: Tensor,
    tokens: Sequence[str] | None = None,
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
    columns: int = 4,
    panels: str | None = None,
) -> Figure:
    """A pyplot figure of one map or a grid of maps, with a shared colour bar.

    Args:
        weights: ``(L, S)``; ``(1, H, L, S)`` (one sequence's per-head weights: a grid of
            heads); or ``(P, L, S)`` with ``panels`` saying what its first axis is (a leading
            axis of 1 needs no ``panels``).
        tokens: L query labels; also the key labels when ``key_tokens`` is None and L == S
            (self-attention).
        key_tokens: S key labels.
        title: the figure's title.
        columns: maps per row in a grid.
        panels: what the first of three axes is, e.g. ``"head"`` for the ``(H, L, S)`` weights
            of an unbatched call or of ``minilm.attention_maps(...)[1][layer]``, ``"item"`` for
            the ``(N, L, S)`` averaged weights of a batch; panel i is titled ``f"{panels} {i}"``.

    Returns:
        A matplotlib Figure created through pyplot, so ``figure.show()`` (and ``plt.show()``)
        displays it, and notebooks draw it. pyplot keeps it until ``plt.close(figure)``: close
        the figures you are done with when drawing many. :func:`save_attention` writes a file
        without pyplot.

    Raises:
        ValueError: a shape other than the above (a 3-D tensor of several maps without
            ``panels``, a batch of several items), or label counts that do not match it.
        ModuleNotFoundError: matplotlib is not installed (the ``plot`` extra).
    """
    pyplot = _import_matplotlib("matplotlib.pyplot")
    return _draw(pyplot.figure, weights, tokens, key_tokens, title, columns, panels)


def _draw(new_figure, weights, tokens, key_tokens, title, columns, panels) -> Figure:
    """Draws :func:`attention_figure` on a figure from ``new_figure(figsize=..., ...)``."""
    w, panels = _as_maps(weights, panels)
    tokens, key_tokens = _token_list("tokens", tokens), _token_list("key_tokens", key_tokens)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise TypeError(
            f"Invalid argument `columns`: expected a positive int. Received: {columns!r}."
        )
    count, query_len, key_len = w.shape
    if key_tokens is None and tokens is not None and query_len == key_len:
        key_tokens = tokens
    # Checked here under the names this function takes (heatmap's are query_/key_tokens).
    tokens = _labels("tokens", tokens, query_len, "one per query, L")
    key_tokens = _labels("key_tokens", key_tokens, key_len, "one per key, S")
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    side = _side(query_len, key_len)
    # Room for the rotated labels, the colour bar and the titles around the maps.
    width = columns * side * key_len / max(query_len, key_len) + 1.6 + (1.0 if tokens else 0)
    height = rows * side * query_len / max(query_len, key_len) + 1.0 + (1.0 if tokens else 0)
    figure = new_figure(figsize=(width, height), layout="constrained", dpi=120)
    axes = figure.subplots(rows, columns, squeeze=False)
    vmax = _scale_top(w)
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.set_axis_off()
            continue
        image = heatmap(
            ax,
            w[index],
            query_tokens=tokens,
            key_tokens=key_tokens,
            vmax=vmax,
            title=f"{panels} {index}" if panels else None,
        )
    for ax in axes[:, 0]:
        ax.set_ylabel("query")
    for ax in axes[-1, :]:
        ax.set_xlabel("key")
    colorbar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    colorbar.set_label("attention weight")
    if title:
        figure.suptitle(title, **_PLAIN)
    return figure


def save_attention(
    weights: Tensor,
    path: str | Path,
    tokens: Sequence[str] | None = None,
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
    columns: int = 4,
    panels: str | None = None,
) -> Path:
    """Writes :func:`attention_figure` of ``weights`` to ``path`` and returns the path.

    The suffix picks the format (``.png``, ``.jpg``, ``.pdf``, ``.svg``, ...: see
    :func:`image_formats`); a path without a suffix gets PNG. Missing parent folders are
    created. The figure is drawn without pyplot and not kept. The other arguments are those of
    :func:`attention_figure`.

    Raises:
        ValueError: a suffix matplotlib cannot write, or what :func:`attention_figure` raises.
        ModuleNotFoundError: matplotlib is not installed (the ``plot`` extra).
    """
    path = Path(path)
    image = image_format(path)
    figure_module = _import_matplotlib("matplotlib.figure")
    figure = _draw(figure_module.Figure, weights, tokens, key_tokens, title, columns, panels)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=image)
    return path
