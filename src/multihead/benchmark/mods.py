"""Mask mods with block skipping, against the same constraint as a dense mask and against flex.

Shape legend: N batch (1), H heads, L query length, S key length (= L), D head dim (E / H).

Each case is one ``mask_mod`` (flex's signature: ``mask_mod(b, h, q_idx, kv_idx)``, True =
attend) on self-attention at ``(N, H, L, D)``, fp32, ``need_weights=False``:

- ``window``: :func:`multihead.mods.sliding_window` (causal);
- ``document``: :func:`multihead.mods.document`, ``documents`` documents of ``L / documents``
  tokens each;
- ``causal``: :data:`multihead.mods.causal`; ours also runs with ``is_causal=True`` instead.

Contenders, timed on the attention call itself and interleaved round by round (medians of the
per-round ratios, as everywhere in the benchmark):

- ``ours``: ``multihead.attention(q, k, v, mask_mod=mod)``; the call includes all of its own
  mask work. ``ours_is_causal`` (the causal case): ``multihead.attention(q, k, v,
  is_causal=True)``.
- ``dense``: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)``, ``mask`` the additive
  float ``(L, S)`` mask (0 / -inf) of the same mod. It is built outside the timed region (a
  bool mask would make SDPA build that float mask inside every call).
- ``flex``: ``torch.compile(flex_attention)`` with ``create_block_mask(mod, None, None, L, S)``
  built outside the timed region, after one compiling call. Inference only: flex's backward
  on CPU raises NotImplementedError.

Modes: ``infer`` (under ``torch.no_grad()``) and ``train`` (forward and the backward of
``out.sum()`` into q, k and v).

Visible tiles: the ``tile x tile`` blocks of the ``(L, S)`` grid with at least one visible
(query, key) pair, per (batch, head), counted from the mod evaluated on the dense grid once.
Time per visible tile = time / (N * H * visible tiles).

Peak memory: what one call adds at its peak, in a fresh interpreter per (case, mode,
contender), as :mod:`.memory` measures it (CPU: VmHWM after clear_refs minus the resident set
before; CUDA: max_memory_allocated minus allocated). Inputs, and the dense mask for ``dense``,
exist before the call and are not counted; flex is measured after its compiling call, the
others after one call at L = 256 (so that the ops' code pages, which the resident set counts
the first time an op runs, are not taken for the call's memory).

Run: ``python -m multihead.benchmark.mods [--quick] [--out DIR]`` (writes mods.md / .json);
``python -m multihead bench`` runs it too (``--no-mods`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import memory
from .cli import LOCAL_OUT, PUBLISHED_OUT, output_dir, positive_seconds
from .machine import gemm_gflops, machine_info
from .timing import interleaved, median_ratio

CASES = ("window", "document", "causal")
MODES = ("infer", "train")
# Contenders, ours first; ours_is_causal runs in the causal case only, flex in inference only.
CONTENDERS = ("ours", "ours_is_causal", "dense", "flex")
OURS = ("ours", "ours_is_causal")

MIN_ROUNDS = 5
MAX_ROUNDS = 300

# The targets: ours / dense time by case (both modes), ours / flex inference time (every
# case) and ours' peak memory against the dense route's (every case and mode).
DENSE_TARGETS = {"window": 0.25, "document": 0.30}
FLEX_TARGET = 1.5
MEMORY_TARGET = 1.0

FLEX_NO_TRAIN = "flex: no training column (its backward on CPU raises NotImplementedError)"


@dataclass(frozen=True)
class Config:
    """Sizes and switches of the section.

    Attributes:
        seq_len: L (= S).
        embed_dim, heads: E and H; D = E / H.
        window: the sliding window of the ``window`` case.
        documents: how many equal documents the ``document`` case splits L into.
        tile: the tile edge that visible tiles are counted in.
        modes: a subset of :data:`MODES`.
        flex: time torch's compiled flex_attention (inference); each case compiles once.
        memory: measure peak memory (fresh interpreters).
        memory_modes: the modes whose memory is measured.
        flex_memory: measure flex's peak memory too (each measurement compiles again).
        budget_s: seconds of timed rounds per (case, mode).
        device: ``"cpu"`` or ``"cuda"``.
    """

    seq_len: int = 8192
    embed_dim: int = 512
    heads: int = 8
    window: int = 512
    documents: int = 8
    tile: int = 128
    modes: tuple[str, ...] = MODES
    flex: bool = True
    memory: bool = True
    memory_modes: tuple[str, ...] = MODES
    flex_memory: bool = True
    budget_s: float = 8.0
    device: str = "cpu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads


FULL = Config()
# --quick: L 2048, window 128, 4 documents of 512; memory of inference only, flex's not at all.
QUICK = Config(
    seq_len=2048,
    window=128,
    documents=4,
    budget_s=1.5,
    memory_modes=("infer",),
    flex_memory=False,
)


def mask_mod(case: str, config: Config, device: torch.device) -> Callable:
    """The mask_mod of ``case`` at ``config``'s sizes."""
    from .. import mods

    if case == "window":
        return mods.sliding_window(config.window)
    if case == "document":
        length = config.seq_len // config.documents
        ids = torch.arange(config.seq_len, device=device) // length  # (S,)
        return mods.document(ids)
    if case == "causal":
        return mods.causal
    raise ValueError(f"Expected a case in {CASES}; received {case!r}")


def dense_visible(mod: Callable, config: Config, device: torch.device) -> Tensor:
    """The mod evaluated on the whole ``(L, S)`` grid, batch 0, head 0: bool, True = attend."""
    from torch.nn.attention.flex_attention import create_mask

    length = config.seq_len
    visible = create_mask(mod, 1, 1, length, length, device=device)  # (1, 1, L, S)
    return visible[0, 0]


def visible_tiles(visible: Tensor, tile: int) -> int:
    """How many ``tile x tile`` blocks of ``visible`` (L, S) hold at least one True."""
    rows, cols = visible.shape
    padded = torch.zeros(-(-rows // tile) * tile, -(-cols // tile) * tile, dtype=torch.bool)
    padded[:rows, :cols] = visible.cpu()
    blocks = padded.view(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    return int(blocks.any(dim=3).any(dim=1).sum())


def contenders(case: str, mode: str, config: Config) -> tuple[str, ...]:
    """The contenders of ``(case, mode)``: ours first."""
    names = ["ours"]
    if case == "causal":
        names.append("ours_is_causal")
    names.append("dense")
    if config.flex and mode == "infer":
        names.append("flex")
    return tuple(names)


def _inputs(config: Config, mode: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``(1, H, L, D)`` fp32; leaves that require grad in ``train`` mode."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, config.heads, config.seq_len, config.head_dim)
    q, k, v = (torch.randn(shape, generator=generator).to(device) for _ in range(3))
    return tuple(t.requires_grad_(mode == "train") for t in (q, k, v))  # type: ignore[return-value]


def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def build_call(
    case: str,
    mode: str,
    name: str,
    config: Config,
    device: torch.device,
    *,
    mod: Callable | None = None,
    visible: Tensor | None = None,
    flex: Callable | None = None,
) -> Callable[[], Tensor]:
    """One zero-argument call of contender ``name``; it returns the attention output.

    Everything outside the call is built here: q, k, v; the dense float mask (``dense``,
    from ``visible``); the block mask (``flex``, which is also compiled and run once here).
    Pass ``mod``, ``visible`` and ``flex`` to share them between contenders.
    """
    import multihead

    mod = mod if mod is not None else mask_mod(case, config, device)
    q, k, v = _inputs(config, mode, device)
    if name == "ours":

        def forward() -> Tensor:
            return multihead.attention(q, k, v, mask_mod=mod)[0]
    elif name == "ours_is_causal":

        def forward() -> Tensor:
            return multihead.attention(q, k, v, is_causal=True)[0]
    elif name == "dense":
        if visible is None:
            visible = dense_visible(mod, config, device)
        mask = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
        del visible

        def forward() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif name == "flex":
        if mode != "infer":
            raise ValueError(FLEX_NO_TRAIN)
        from torch.nn.attention.flex_attention import create_block_mask

        length = config.seq_len
        block_mask = create_block_mask(mod, None, None, length, length, device=str(device))
        compiled = flex if flex is not None else _compiled_flex()

        def forward() -> Tensor:
            return compiled(q, k, v, block_mask=block_mask)

        with torch.no_grad():
            forward()  # compiles
    else:
        raise ValueError(f"Expected a contender in {CONTENDERS}; received {name!r}")

    if mode == "infer":

        def call() -> Tensor:
            with torch.no_grad():
                return forward()
    else:

        def call() -> Tensor:
            out = forward()
            torch.autograd.grad(out.sum(), (q, k, v))  # fresh gradients, nothing accumulates
            return out

    return call


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_case(case: str, mode: str, config: Config) -> dict:
    """Times every contender of ``(case, mode)`` interleaved; returns its row (no memory)."""
    device = torch.device(config.device)
    length, tile = config.seq_len, config.tile
    row: dict = {"case": case, "mode": mode, "N": 1, "H": config.heads, "L": length, "S": length}
    row["D"] = config.head_dim
    notes = []
    mod = mask_mod(case, config, device)
    visible = dense_visible(mod, config, device)  # (L, S), outside any timing
    tiles = visible_tiles(visible, tile)
    total = math.ceil(length / tile) ** 2
    row.update(tile=tile, visible_tiles=tiles, total_tiles=total, visible_fraction=tiles / total)
    row["visible_pairs_fraction"] = int(visible.sum()) / visible.numel()
    calls: dict[str, Callable[[], Tensor]] = {}
    for name in contenders(case, mode, config):
        if name == "flex":
            try:
                start = time.perf_counter()
                calls[name] = build_call(case, mode, name, config, device, mod=mod)
                row["flex_compile_s"] = time.perf_counter() - start
            except Exception as error:  # no compiler, no flex in this torch, ...
                notes.append(f"flex: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        calls[name] = build_call(case, mode, name, config, device, mod=mod, visible=visible)
    del visible
    if mode == "train" and config.flex:
        notes.append(FLEX_NO_TRAIN)
    if mode == "infer":  # forward agreement with the dense route, outside timing
        reference = calls["dense"]()
        for name in calls:
            if name != "dense":
                row[f"{name}_max_abs_diff"] = float((calls[name]() - reference).abs().max())
        del reference
    samples = interleaved(
        calls,
        budget_s=config.budget_s,
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
        sync=_sync(device),
    )
    row["rounds"] = len(samples["ours"])
    for name, seconds in samples.items():
        row[f"{name}_ms"] = statistics.median(seconds) * 1e3
    for name in OURS:
        if name not in samples:
            continue
        work_tiles = row["N"] * row["H"] * tiles
        row[f"{name}_us_per_tile"] = statistics.median(samples[name]) * 1e6 / work_tiles
        row[f"{name}_over_dense"] = median_ratio(samples[name], samples["dense"])
        if "flex" in samples:
            row[f"{name}_over_flex"] = median_ratio(samples[name], samples["flex"])
    row["dense_us_per_tile"] = row["dense_ms"] * 1e3 / (row["N"] * row["H"] * tiles)
    row["dense_mask_mib"] = length * length * 4 / memory.MIB
    row["note"] = "; ".join(notes)
    return row


def _peak_command(case: str, mode: str, name: str, config: Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "multihead.benchmark.mods",
        "--peak",
        case,
        mode,
        name,
        *("--seq-len", str(config.seq_len), "--embed-dim", str(config.embed_dim)),
        *("--heads", str(config.heads), "--window", str(config.window)),
        *("--documents", str(config.documents), "--device", config.device),
    ]


def measure_here(case: str, mode: str, name: str, config: Config) -> dict[str, float | str]:
    """Builds contender ``name`` in this process, runs one call and returns its peak.

    Call it in a fresh process (see :func:`measure`): whatever ran before shapes the result.
    """
    device = torch.device(config.device)
    if name != "flex":  # flex has run once at full size already (its compiling call)
        # The ops' code is faulted in by a small call first: on CPU the resident set counts
        # a library's code pages the first time an op runs (up to 40 MiB for the tiled
        # kernel's few mask ops here), which is not memory the call holds. Small, so that
        # next to no freed heap is left to hide the measured call's allocations.
        small = replace(config, seq_len=256, window=min(config.window, 32))
        build_call(case, mode, name, small, device)()
    call = build_call(case, mode, name, config, device)
    return memory.peak_of(call, device)


def measure(case: str, mode: str, name: str, config: Config, timeout_s: float = 900) -> float:
    """Peak MiB that one call of contender ``name`` adds, measured in a fresh interpreter.

    Raises:
        RuntimeError: the measuring process failed or timed out; the message has its stderr.
    """
    source_root = str(Path(__file__).resolve().parents[2])  # this very package, installed or not
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            _peak_command(case, mode, name, config),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"memory measurement timed out after {timeout_s:.0f} s") from error
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory measurement failed ({done.returncode}): {tail[0]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def measure_memory(row: dict, config: Config) -> None:
    """Adds ``<contender>_mib`` and ``<ours>_mem_over_dense`` to ``row`` (failures: its note)."""
    case, mode = row["case"], row["mode"]
    for name in contenders(case, mode, config):
        if name == "flex" and (not config.flex_memory or "flex_ms" not in row):
            continue
        try:
            row[f"{name}_mib"] = measure(case, mode, name, config)
        except RuntimeError as error:
            row["note"] = "; ".join(filter(None, [row.get("note"), f"{name} memory: {error}"]))
    for name in OURS:
        if row.get(f"{name}_mib") is not None and row.get("dense_mib"):
            row[f"{name}_mem_over_dense"] = row[f"{name}_mib"] / row["dense_mib"]


def targets(rows: list[dict]) -> list[dict]:
    """Each target of the issue that ``rows`` measured: what, the value, the limit, pass."""
    checks = []

    def check(row: dict, name: str, key: str, limit: float, what: str) -> None:
        value = row.get(f"{name}_{key}")
        if value is None:
            return
        label = "ours (is_causal)" if name == "ours_is_causal" else "ours"
        checks.append(
            {
                "case": row["case"],
                "mode": row["mode"],
                "target": f"{label} {what} <= {limit:g}",
                "key": f"{name}_{key}",
                "value": value,
                "limit": limit,
                "pass": value <= limit,
            }
        )

    for row in rows:
        for name in OURS:
            if row["case"] in DENSE_TARGETS:
                check(row, name, "over_dense", DENSE_TARGETS[row["case"]], "time / dense mask")
            check(row, name, "over_flex", FLEX_TARGET, "time / compiled flex forward")
            check(row, name, "mem_over_dense", MEMORY_TARGET, "peak memory / dense mask")
    return checks


def run(config: Config, progress: bool = True) -> list[dict]:
    """Times (and with ``config.memory`` measures) every case and mode; one row each.

    A failing (case, mode) becomes a row with a note, and the rest still runs.
    """
    if config.seq_len % config.documents:
        raise ValueError(
            f"Expected documents to divide seq_len; received {config.documents} and "
            f"{config.seq_len}"
        )
    rows = []
    for case in CASES:
        for mode in config.modes:
            try:
                row = time_case(case, mode, config)
            except Exception as error:  # one broken case must not lose the rest of the run
                row = {"case": case, "mode": mode, "N": 1, "H": config.heads}
                row.update(L=config.seq_len, S=config.seq_len, D=config.head_dim)
                row["note"] = f"error: {type(error).__name__}: {error}"
            gc.collect()  # the case's tensors go before the memory processes start
            if config.memory and mode in config.memory_modes and "ours_ms" in row:
                measure_memory(row, config)
            rows.append(row)
            if progress:
                print(f"mods {case} {mode}: {_summary(row)}", file=sys.stderr, flush=True)
    return rows


def _summary(row: dict) -> str:
    if "ours_ms" not in row:
        return row.get("note", "failed")
    parts = [f"ours {row['ours_ms']:.3g} ms", f"ours/dense {row['ours_over_dense']:.2f}"]
    if "ours_over_flex" in row:
        parts.append(f"ours/flex {row['ours_over_flex']:.2f}")
    if "ours_mem_over_dense" in row:
        parts.append(f"memory ours/dense {row['ours_mem_over_dense']:.2f}")
    return ", ".join(parts)


def _number(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    number = float(value)  # type: ignore[arg-type]
    if number >= 100:
        return f"{number:.0f}"
    if number >= 10:
        return f"{number:.1f}"
    return f"{number:.{digits}g}"


def _ratio(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


_HEADER = (
    "| case | mode | visible tiles | ours ms | ours us/tile | dense ms | ours/dense | flex ms "
    "| ours/flex | ours MiB | dense MiB | flex MiB | mem ours/dense | rounds |"
)


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per (case, mode, our variant)."""
    lines = [_HEADER, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for name in OURS:
            if name == "ours_is_causal" and "ours_is_causal_ms" not in row:
                continue
            case = row["case"] + (" (is_causal)" if name == "ours_is_causal" else "")
            if row["case"] == "causal" and name == "ours":
                case += " (mask_mod)"
            tiles = row.get("visible_tiles")
            tiles_cell = "-" if tiles is None else f"{tiles}/{row['total_tiles']}"
            cells = [
                case,
                row["mode"],
                tiles_cell,
                _number(row.get(f"{name}_ms")),
                _number(row.get(f"{name}_us_per_tile")),
                _number(row.get("dense_ms")),
                _ratio(row.get(f"{name}_over_dense")),
                _number(row.get("flex_ms")),
                _ratio(row.get(f"{name}_over_flex")),
                _number(row.get(f"{name}_mib")),
                _number(row.get("dense_mib")),
                _number(row.get("flex_mib")),
                _ratio(row.get(f"{name}_mem_over_dense")),
                str(row.get("rounds", "-")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], machine: dict, config: Config, checks: list[dict]) -> str:
    """The report: machine, sizes, method, the table, the targets with pass / miss, notes."""
    length = config.seq_len
    lines = [
        "# Mask mods with block skipping: against a dense mask and compiled flex_attention",
        "",
        f"- CPU: {machine.get('cpu')} ({machine.get('cpu_count')} cores, "
        f"torch threads {machine.get('torch_threads')})",
        f"- device: {machine.get('device')} {machine.get('gpu') or ''}".rstrip(),
        f"- torch {machine.get('torch_version')}, Python {machine.get('python_version')}",
        f"- date: {machine.get('date')}",
        f"- q, k, v (N, H, L, D) = (1, {config.heads}, {length}, {config.head_dim}) "
        f"(E {config.embed_dim}), fp32, need_weights=False; tiles {config.tile}x{config.tile}",
        f"- cases: window = sliding_window({config.window}) (causal); document = "
        f"{config.documents} documents of {length // config.documents} tokens; causal = "
        "mods.causal (and is_causal=True)",
        "",
        table(rows),
        "",
        "Times are medians over interleaved rounds (the order rotates each round); ratios are "
        "medians of the per-round ratios, so below 1 ours is faster. ours: "
        "multihead.attention(q, k, v, mask_mod=mod), its own mask work included in the call. "
        "dense: F.scaled_dot_product_attention with the same constraint as an additive float "
        "(L, S) mask, built outside the timed region (and its "
        f"{length * length * 4 / memory.MIB:.0f} MiB not counted in its memory). flex: "
        "torch.compile(flex_attention) with create_block_mask(mod, None, None, L, S) built "
        "outside the timed region, timed after a compiling call; inference only, as flex's "
        "backward on CPU raises NotImplementedError. train: forward and the backward of "
        "out.sum() into q, k and v. us/tile: microseconds per visible tile (a tile with at "
        "least one visible pair), per batch and head. Memory: the peak one call adds, in a "
        "fresh process per contender (CPU: resident set; flex measured after its compiling "
        "call).",
        "",
        "## Targets",
        "",
    ]
    if checks:
        lines += ["| case | mode | target | value | result |", "|---|---|---|---:|---|"]
        for c in checks:
            result = "pass" if c["pass"] else "miss"
            lines.append(
                f"| {c['case']} | {c['mode']} | {c['target']} | {c['value']:.2f} | {result} |"
            )
    else:
        lines.append("No target was measured.")
    notes = [f"- {row['case']} {row['mode']}: {row['note']}" for row in rows if row.get("note")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], machine: dict, config: Config, out_dir: Path) -> list[Path]:
    """Writes ``mods.md`` and ``mods.json`` into ``out_dir`` (created when missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = targets(rows)
    md_path, json_path = out_dir / "mods.md", out_dir / "mods.json"
    md_path.write_text(markdown(rows, machine, config, checks))
    payload = {
        "machine": machine,
        "config": {**asdict(config), "head_dim": config.head_dim},
        "targets": {
            "ours_over_dense": DENSE_TARGETS,
            "ours_over_flex": FLEX_TARGET,
            "mem_over_dense": MEMORY_TARGET,
        },
        "checks": checks,
        "all_pass": bool(checks) and all(c["pass"] for c in checks),
        "rows": rows,
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return [md_path, json_path]


def config_for(
    *, quick: bool, budget_s: float | None, memory: bool, flex: bool = True, device: str = "cpu"
) -> Config:
    """The config of a ``bench`` run: the full or quick sizes, its budget and switches."""
    base = QUICK if quick else FULL
    return replace(
        base,
        budget_s=budget_s if budget_s is not None else base.budget_s,
        memory=memory,
        flex=flex,
        device=device,
    )


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    if not modes or any(mode not in MODES for mode in modes):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(MODES)}; received {text!r}"
        )
    return modes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m multihead.benchmark.mods [--quick] [--out DIR] [...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m multihead.benchmark.mods",
        description="Times multihead.attention with mask mods (sliding window, documents, "
        "causal) against SDPA with the same dense mask and against compiled flex_attention; "
        "writes mods.md and mods.json.",
    )
    parser.add_argument("--quick", action="store_true", help="L 2048, window 128, 4 documents")
    parser.add_argument(
        "--out",
        type=Path,
        default=LOCAL_OUT,
        help=f"folder for mods.md and mods.json (default: {LOCAL_OUT}, git-ignored; "
        f"{PUBLISHED_OUT} is what the README quotes)",
    )
    parser.add_argument(
        "--budget", type=positive_seconds, default=None, help="seconds of rounds per case"
    )
    parser.add_argument("--modes", type=_modes, default=None, help="infer,train (default both)")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled flex_attention")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    for flag in ("--seq-len", "--embed-dim", "--heads", "--window", "--documents"):
        parser.add_argument(flag, type=_positive_int, default=None, help="override the size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--peak", nargs=3, metavar=("CASE", "MODE", "CONTENDER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    config = config_for(
        quick=args.quick,
        budget_s=args.budget,
        memory=not args.no_memory,
        flex=not args.no_flex,
        device=args.device,
    )
    sizes = {
        "seq_len": args.seq_len,
        "embed_dim": args.embed_dim,
        "heads": args.heads,
        "window": args.window,
        "documents": args.documents,
    }
    config = replace(config, **{key: value for key, value in sizes.items() if value is not None})
    if args.modes is not None:
        config = replace(config, modes=args.modes)
    if args.peak is not None:  # the memory child
        case, mode, name = args.peak
        print(json.dumps(measure_here(case, mode, name, config)))
        return 0
    if config.embed_dim % config.heads or config.seq_len % config.documents:
        parser.error("expected heads to divide embed-dim and documents to divide seq-len")
    out, problem = output_dir(argparse.Namespace(out=args.out, publish=False))
    if problem is not None:
        parser.error(problem)
    device = torch.device(config.device)
    machine = machine_info(device, gemm_gflops(device))
    rows = run(config)
    paths = write(rows, machine, config, out)
    print(table(rows))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
