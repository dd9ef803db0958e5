"""Runs the grid: per case, interleaved timing (ours, torch, ORT, causal mask variants), FLOP
rates and peak memory, then the reports. A failing case becomes a row with a note.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import decode as decode_benchmark
from . import memory
from . import mods as mods_benchmark
from .cases import (
    MODES,
    ONNX_MODES,
    Case,
    flops,
    full_grid,
    memory_in_quick,
    quick_grid,
    torch_skip_reason,
)
from .cli import LOCAL_OUT
from .machine import gemm_gflops, machine_info
from .onnx_runtime import ort_column
from .plots import write_plots
from .report import write_tables
from .timing import interleaved, median_ratio
from .workload import build_input, build_layers, implementations, make_calls

# Every case gets at least MIN_ROUNDS rounds, however slow; fast cases get up to MAX_ROUNDS.
MIN_ROUNDS = 5
MAX_ROUNDS = 300


@dataclass(frozen=True)
class Options:
    """What ``python -m multihead bench`` runs.

    Attributes:
        quick: the small grid and budget (about 2 minutes on 2 cores) instead of the full one.
        out: output directory of the reports (default ``benchmarks/local``, git-ignored;
            ``benchmarks/results`` holds the published ones, see :mod:`.cli`).
        modes: modes to run, a subset of :data:`multihead.benchmark.cases.MODES`.
        memory: measure peak memory (a fresh interpreter per case and implementation).
        onnx: time the ONNX Runtime column where it applies.
        device: ``"cpu"`` or ``"cuda"``.
        budget_s: seconds of timed rounds per case; None for the default (8 s, 1.5 s quick).
        decode: also run the KV-cache decode and the GQA comparison (decode.md / .json / .png).
        mods: also run the mask-mod section (mods.md / .json; see :mod:`.mods`).
    """

    quick: bool = False
    out: Path = LOCAL_OUT
    modes: tuple[str, ...] = MODES
    memory: bool = True
    onnx: bool = True
    device: str = "cpu"
    budget_s: float | None = None
    decode: bool = True
    mods: bool = True

    def grid(self) -> list[Case]:
        return quick_grid(self.modes) if self.quick else full_grid(self.modes)

    def budget(self) -> float:
        if self.budget_s is not None:
            return self.budget_s
        return 1.5 if self.quick else 8.0


def _median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def time_case(case: Case, device: torch.device, options: Options, gemm: float) -> dict:
    """Times one case and returns its row (without memory); see ``report.COLUMNS``."""
    row: dict = {"mode": case.mode, "N": case.batch, "L": case.seq_len}
    row.update({"E": case.embed_dim, "H": case.num_heads, "flops": flops(case)})
    notes = []
    skip = torch_skip_reason(case)
    names = tuple(name for name in implementations(case) if not (skip and name == "torch"))
    if skip:
        notes.append(skip)
    ours, theirs = build_layers(case, device)
    layers = {"ours": ours, "torch": theirs}
    x = build_input(case, device)  # (N, L, E)
    calls: dict[str, Callable[[], object]] = dict(make_calls(case, layers, x, names))
    if options.onnx and case.mode in ONNX_MODES:
        reference = calls.get("torch", calls["ours"])()  # ORT must match torch's output
        column = ort_column(case, layers, x, reference)
        if column.call is not None:
            calls["ort"] = column.call
            row["ort_layer"] = column.layer
        if column.layer == "torch" or column.call is None:
            notes.append(f"ORT ({column.layer or 'none'}): {column.note}")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples = interleaved(
        calls,
        budget_s=options.budget(),
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
        sync=sync,
    )
    ours_s = samples["ours"]
    row["rounds"] = len(ours_s)
    row["ours_ms"] = _median_ms(ours_s)
    row["ours_gflops"] = flops(case) / statistics.median(ours_s) / 1e9
    row["ours_pct_gemm"] = 100 * row["ours_gflops"] / gemm
    for name, ms_key, ratio_key in (
        ("torch", "torch_ms", "ours_over_torch"),
        ("ort", "ort_ms", "ours_over_ort"),
    ):
        if name in samples:
            row[ms_key] = _median_ms(samples[name])
            row[ratio_key] = median_ratio(ours_s, samples[name])
    for name, ratio_key in (
        ("ours_bool_mask", "bool_mask_over_is_causal"),
        ("ours_float_mask", "float_mask_over_is_causal"),
    ):
        if name in samples:
            row[ratio_key] = median_ratio(samples[name], ours_s)
    row["note"] = "; ".join(notes)
    return row


def measure_memory(case: Case, device: torch.device, row: dict) -> None:
    """Adds ``ours_mib``, ``torch_mib`` and their ratio to ``row`` (failures go to its note)."""
    for name in ("ours", "torch"):
        if name == "torch" and torch_skip_reason(case):
            continue
        try:
            row[f"{name}_mib"] = memory.measure(case, name, device)
        except RuntimeError as error:
            row["note"] = "; ".join(filter(None, [row.get("note"), f"{name} memory: {error}"]))
    if row.get("ours_mib") is not None and row.get("torch_mib"):
        row["mem_ours_over_torch"] = row["ours_mib"] / row["torch_mib"]


class _Progress:
    """A tqdm bar over the cases, or one line per case on stderr without tqdm."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)

    def start(self, case: Case) -> None:
        if self.bar is not None:
            self.bar.set_description(case.name)

    def finish(self, case: Case, row: dict) -> None:
        self.done += 1
        ratio = row.get("ours_over_torch")
        summary = f"ours {row['ours_ms']:.3g} ms" if row.get("ours_ms") else "failed"
        if ratio:
            summary += f", ours/torch {ratio:.2f}"
        if row.get("mem_ours_over_torch"):
            summary += f", memory ours/torch {row['mem_ours_over_torch']:.2f}"
        line = f"[{self.done}/{self.total}] {case.name}: {summary}"
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(options: Options) -> tuple[list[dict], dict, list[Path]]:
    """Runs the benchmark and writes the reports into ``options.out``.

    Returns:
        ``(rows, machine, paths)``: the result rows, the machine facts and the files written.

    Raises:
        ValueError: ``options.device`` is CUDA and CUDA is not available.
    """
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("Received device='cuda', but torch.cuda.is_available() is False")
    machine = machine_info(device, gemm_gflops(device))
    cases = options.grid()
    progress = _Progress(len(cases))
    rows = []
    for case in cases:
        progress.start(case)
        try:
            row = time_case(case, device, options, float(machine["gemm_gflops"]))
        except Exception as error:  # one broken case must not lose the rest of the run
            row = {"mode": case.mode, "N": case.batch, "L": case.seq_len, "E": case.embed_dim}
            row.update({"H": case.num_heads, "note": f"error: {type(error).__name__}: {error}"})
        gc.collect()  # the case's tensors go before the memory processes start
        if options.memory and (not options.quick or memory_in_quick(case)):
            measure_memory(case, device, row)
        rows.append(row)
        progress.finish(case, row)
    progress.close()
    paths = write_tables(rows, machine, options.out)
    if options.decode:
        progress_line = "decode and GQA ..."
        print(progress_line, file=sys.stderr, flush=True)
        decoded = decode_benchmark.decode(device, 256 if options.quick else 1024)
        grouped = decode_benchmark.grouped_query(device, 1024 if options.quick else 2048)
        paths += decode_benchmark.write(decoded, grouped, machine, options.out)
        print(decode_benchmark.markdown(decoded, grouped), file=sys.stderr)
    if options.mods:
        print("mask mods ...", file=sys.stderr, flush=True)
        config = mods_benchmark.config_for(
            quick=options.quick,
            budget_s=options.budget_s,
            memory=options.memory,
            device=options.device,
        )
        mod_rows = mods_benchmark.run(config)
        paths += mods_benchmark.write(mod_rows, machine, config, options.out)
        print(mods_benchmark.table(mod_rows), file=sys.stderr)
    try:
        paths += write_plots(rows, machine, options.out)
    except ImportError:  # matplotlib is imported inside write_plots, only when installed
        print(
            "matplotlib is not installed, so no plots: pip install 'multihead[bench]'",
            file=sys.stderr,
        )
    return rows, machine, paths
