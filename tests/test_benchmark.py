"""The benchmark's pure parts: FLOP counts, grids, the ratio statistics, the interleaving order,
the report files, the memory subprocess and the ORT column. Nothing here asserts on timings."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multihead.__main__ import main as cli_main
from multihead.benchmark import memory, runner
from multihead.benchmark.cases import (
    MODES,
    TRAIN_MAX_LEN,
    Case,
    flops,
    full_grid,
    quick_grid,
    torch_skip_reason,
)
from multihead.benchmark.onnx_runtime import ort_column
from multihead.benchmark.report import COLUMNS, MACHINE, write_tables
from multihead.benchmark.timing import choose_rounds, interleaved, median_ratio
from multihead.benchmark.workload import build_input, build_layers, implementations, make_calls


def matmul_flops(m: int, k: int, n: int) -> int:
    """An (m, k) @ (k, n) product: m * n dot products of length k, a multiply and an add each."""
    return 2 * m * k * n


@pytest.mark.parametrize(("n", "length", "e", "h"), [(2, 5, 16, 4), (1, 2048, 512, 8)])
def test_flops_count_the_matmuls_of_one_forward(n, length, e, h):
    d = e // h
    in_projection = matmul_flops(n * length, e, 3 * e)
    out_projection = matmul_flops(n * length, e, e)
    scores = n * h * matmul_flops(length, d, length)  # q k^T per head
    mixing = n * h * matmul_flops(length, length, d)  # weights v per head
    forward = in_projection + out_projection + scores + mixing
    for mode in ("infer", "infer_weights"):
        assert flops(Case(mode, n, length, e, h)) == forward
    assert flops(Case("causal", n, length, e, h)) == forward - (scores + mixing) // 2
    assert flops(Case("train", n, length, e, h)) == 3 * forward


def test_torch_is_skipped_only_where_its_weights_would_not_fit():
    big = Case("infer_weights", 1, 16384, 512, 8)  # 8 * 16384^2 * 4 bytes = 8 GiB
    assert "8.0 GiB" in torch_skip_reason(big)
    assert torch_skip_reason(Case("train", 1, 16384, 512, 8)) is not None
    assert torch_skip_reason(Case("infer", 1, 16384, 512, 8)) is None  # no weights returned
    assert torch_skip_reason(Case("infer_weights", 1, 8192, 512, 8)) is None  # 2 GiB


def test_full_grid_reaches_8192_except_in_training():
    grid = full_grid()
    longest = {mode: max(case.seq_len for case in grid if case.mode == mode) for mode in MODES}
    assert longest == {"infer": 8192, "infer_weights": 8192, "causal": 8192, "train": 4096}
    assert TRAIN_MAX_LEN == 4096
    assert Case("infer", 2, 5, 16, 4) in grid
    assert Case("train", 16, 256, 512, 8) in grid
    assert Case("train", 8, 256, 512, 8) in grid  # training only
    assert Case("infer", 8, 256, 512, 8) not in grid
    assert [case.mode for case in full_grid(("causal",))] == ["causal"] * 7


def test_quick_grid():
    names = {case.name for case in quick_grid()}
    assert names == {
        *(f"{mode} N2 L5 E16 H4" for mode in MODES),
        *(f"{mode} N1 L2048 E512 H8" for mode in MODES),
        "infer N16 L256 E512 H8",
    }


def test_median_ratio_is_the_median_of_the_per_round_ratios():
    ours, theirs = [1.0, 10.0, 100.0], [2.0, 5.0, 1000.0]  # ratios 0.5, 2, 0.1
    assert median_ratio(ours, theirs) == 0.5  # the ratio of the medians would be 2
    assert median_ratio([3.0, 1.0], [1.0, 1.0]) == 2.0


def test_median_ratio_rejects_unpaired_rounds():
    with pytest.raises(ValueError, match="equally long"):
        median_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        median_ratio([], [])


def test_choose_rounds_fits_the_budget_within_bounds():
    assert choose_rounds(0.1, budget_s=2.0, min_rounds=5, max_rounds=300) == 20
    assert choose_rounds(10.0, budget_s=2.0, min_rounds=5, max_rounds=300) == 5
    assert choose_rounds(1e-6, budget_s=2.0, min_rounds=5, max_rounds=300) == 300


def test_interleaved_rotates_which_call_goes_first():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    samples = interleaved(calls, budget_s=0.0, min_rounds=6, max_rounds=6)
    assert {name: len(times) for name, times in samples.items()} == {"a": 6, "b": 6, "c": 6}
    # Two warm-up calls each, then rounds; repeats make every call run several times a sample,
    # so read the round order from the changes of name.
    timed = order[6:]
    firsts = [timed[0]] + [now for before, now in itertools.pairwise(timed) if before != now]
    rounds = [firsts[i : i + 3] for i in range(0, len(firsts), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_causal_calls_give_the_same_output():
    case = Case("causal", 2, 5, 16, 4)
    ours, theirs = build_layers(case, torch.device("cpu"))
    x = build_input(case, torch.device("cpu"))  # (N, L, E)
    calls = make_calls(case, {"ours": ours, "torch": theirs}, x, implementations(case))
    outputs = {name: call() for name, call in calls.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["torch"], msg=name)


def test_train_call_sets_fresh_gradients_each_time():
    case = Case("train", 2, 5, 16, 4)
    ours, theirs = build_layers(case, torch.device("cpu"))
    x = build_input(case, torch.device("cpu"))  # (N, L, E)
    call = make_calls(case, {"ours": ours, "torch": theirs}, x, ("ours",))["ours"]
    call()
    first = x.grad.clone()
    call()
    torch.testing.assert_close(x.grad, first)  # replaced, not accumulated


def fake_rows() -> list[dict]:
    rows = []
    for mode in MODES:
        for length in (5, 512, 1024):
            rows.append(
                {
                    "mode": mode,
                    "N": 2 if length == 5 else 1,
                    "L": length,
                    "E": 16 if length == 5 else 512,
                    "H": 4 if length == 5 else 8,
                    "rounds": 7,
                    "ours_ms": 0.05 * length,
                    "torch_ms": 0.08 * length,
                    "ours_over_torch": 0.6,
                    "ours_gflops": 120.0,
                    "ours_pct_gemm": 60.0,
                    "ours_mib": 1.0 * length,
                    "torch_mib": 4.0 * length,
                    "mem_ours_over_torch": 0.25,
                    "note": "torch skipped" if mode == "train" and length == 1024 else "",
                }
            )
    return rows


MACHINE_FACTS = {
    "cpu": "Test CPU",
    "cpu_count": 2,
    "torch_threads": 2,
    "torch_version": "2.x",
    "python_version": "3.x",
    "device": "cpu",
    "gpu": "",
    "gemm_gflops": 200.0,
    "date": "2026-01-01T00:00:00+00:00",
}


def test_write_tables(tmp_path):
    rows = fake_rows()
    paths = write_tables(rows, MACHINE_FACTS, tmp_path / "out")
    assert sorted(path.name for path in paths) == ["results.csv", "results.json", "results.md"]
    with (tmp_path / "out" / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [*COLUMNS, *MACHINE]
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert all(row["cpu"] == "Test CPU" and row["gemm_gflops"] == "200.0" for row in csv_rows)
    assert csv_rows[0]["ort_ms"] == ""  # missing values are empty, not "None"
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["machine"] == MACHINE_FACTS
    assert [row["L"] for row in data["results"]] == [row["L"] for row in rows]
    assert set(data["results"][0]) == {*COLUMNS, *MACHINE}
    md = (tmp_path / "out" / "results.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| mode"))
    for title in ("ours/torch", "ours GFLOP/s", "% GEMM", "mem ours/torch", "ours/ORT"):
        assert f"| {title} |" in header
    table = [line for line in md if line.startswith("| ") and line != header]
    assert len(table) == len(rows)
    assert all(line.count("|") == header.count("|") for line in table)
    assert any("train N1 L1024 E512 H8: torch skipped" in line for line in md)


def test_write_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from multihead.benchmark.plots import write_plots

    paths = write_plots(fake_rows(), MACHINE_FACTS, tmp_path)
    assert sorted(path.name for path in paths) == ["memory.png", "speedup.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def footer_of(fig) -> str:
    return " ".join(" ".join(text.get_text() for text in fig.texts).split())


def assert_footer(fig) -> None:
    text = footer_of(fig)
    for fact in ("Test CPU (2 cores)", "cpu", "torch 2.x", "2026-01-01T00:00:00+00:00"):
        assert fact in text, text


def test_speedup_plot_shows_ours_over_torch_as_the_tables_do():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from multihead.benchmark.plots import speedup_figure

    fig = speedup_figure(fake_rows(), MACHINE_FACTS)
    (ax,) = fig.axes
    assert ax.get_ylabel().startswith("ours/torch time (< 1: ours faster")
    assert "log2 scale" in ax.get_ylabel() and ax.get_yscale() == "log"
    assert "log2 scale" in ax.get_xlabel() and ax.get_xscale() == "log"
    drawn = {float(y) for line in ax.get_lines()[:-1] for y in line.get_ydata()}  # - parity
    assert drawn == {0.6}  # the rows' ours_over_torch, not its inverse
    assert_footer(fig)
    plt.close(fig)


def test_memory_plot_explains_its_markers_and_scales():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from multihead.benchmark.plots import memory_figure

    fig = memory_figure(fake_rows(), MACHINE_FACTS)
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "ours: solid, filled markers" in labels and "torch: dashed, hollow markers" in labels
    assert "log10 scale" in ax.get_ylabel() and "log2 scale" in ax.get_xlabel()
    assert_footer(fig)
    plt.close(fig)


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    from multihead.benchmark.plots import write_plots

    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'multihead\[bench\]'"):
        write_plots(fake_rows(), MACHINE_FACTS, tmp_path)


def test_memory_subprocess_on_a_tiny_case():
    mib = memory.measure(Case("infer", 2, 5, 16, 4), "ours", torch.device("cpu"), timeout_s=120)
    assert mib > 0


def test_memory_module_rejects_an_unknown_implementation(capsys):
    with pytest.raises(SystemExit):
        memory.main(["infer", "2", "5", "16", "4", "ours_bool_mask"])
    assert "impl must be one of" in capsys.readouterr().err


def test_ort_column_needs_a_call_without_weights():
    case = Case("infer_weights", 2, 5, 16, 4)
    column = ort_column(case, {}, torch.zeros(2, 5, 16), torch.zeros(2, 5, 16))
    assert column.call is None
    assert "returns weights" in column.note


def test_ort_column_runs_our_exported_layer():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    case = Case("causal", 2, 5, 16, 4)
    ours, theirs = build_layers(case, torch.device("cpu"))
    x = build_input(case, torch.device("cpu"))  # (N, L, E)
    reference = make_calls(case, {"ours": ours, "torch": theirs}, x, ("torch",))["torch"]()
    column = ort_column(case, {"ours": ours, "torch": theirs}, x, reference)
    assert column.layer == "ours", column.note
    (out,) = column.call()
    torch.testing.assert_close(torch.from_numpy(out), reference, atol=1e-4, rtol=0)


def test_bench_rejects_an_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--modes", "infer,fast"])
    assert "comma-separated list" in capsys.readouterr().err


def test_decode_and_gqa_reports(tmp_path):
    from multihead.benchmark import decode

    cpu = torch.device("cpu")
    decoded = decode.decode(cpu, tokens=6, embed_dim=16, heads=4)
    assert len(decoded["ours_ms"]) == len(decoded["torch_ms"]) == 6
    assert decoded["speedup"] == pytest.approx(decoded["torch_total_ms"] / decoded["ours_total_ms"])
    grouped = decode.grouped_query(cpu, seq_len=8, embed_dim=16, heads=4, kv_heads=2)
    assert grouped["gqa_over_mha_cache"] == pytest.approx(0.5)
    assert decoded["ours_over_torch"] == pytest.approx(1 / decoded["speedup"])
    paths = decode.write(decoded, grouped, MACHINE_FACTS, tmp_path)
    assert {p.name for p in paths} >= {"decode.md", "decode.json"}
    text = (tmp_path / "decode.md").read_text()
    assert "Autoregressive decode" in text and "Grouped-query attention" in text
    assert f"Total time ours/torch: {decoded['ours_over_torch']:.3f} (ours " in text
    if importlib.util.find_spec("matplotlib") is None:
        return
    import matplotlib.pyplot as plt

    assert (tmp_path / "decode.png").read_bytes().startswith(b"\x89PNG")
    fig = decode.decode_figure(decoded, MACHINE_FACTS)
    (ax,) = fig.axes
    assert "log10 scale" in ax.get_ylabel() and "linear scale" in ax.get_xlabel()
    assert "total time ours/torch" in ax.get_title()
    assert_footer(fig)  # as speedup.png and memory.png
    plt.close(fig)


REPO = Path(__file__).resolve().parents[1]


def fake_benchmark(monkeypatch) -> None:
    """The runner with every measurement replaced by a made-up number; the reports are real."""
    from multihead.benchmark import decode

    def time_case(case, device, options, gemm):
        return {
            "mode": case.mode,
            **{"N": case.batch, "L": case.seq_len, "E": case.embed_dim, "H": case.num_heads},
            **{"rounds": 5, "ours_ms": 1.0, "torch_ms": 2.0, "ours_over_torch": 0.5},
            "note": "",
        }

    def measure_memory(case, device, row):
        row.update(ours_mib=1.0, torch_mib=2.0, mem_ours_over_torch=0.5)

    monkeypatch.setattr(runner, "gemm_gflops", lambda device: 100.0)
    monkeypatch.setattr(runner, "machine_info", lambda device, gemm: dict(MACHINE_FACTS))
    monkeypatch.setattr(runner, "time_case", time_case)
    monkeypatch.setattr(runner, "measure_memory", measure_memory)
    real_decode, real_grouped = decode.decode, decode.grouped_query
    monkeypatch.setattr(
        decode, "decode", lambda device, tokens: real_decode(device, 4, embed_dim=16, heads=4)
    )
    monkeypatch.setattr(
        decode,
        "grouped_query",
        lambda device, seq_len: real_grouped(device, 8, embed_dim=16, heads=4, kv_heads=2),
    )
    from multihead.benchmark import mods

    monkeypatch.setattr(mods, "run", lambda config: [])  # tests/test_benchmark_mods.py runs it


def written(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_a_plain_run_writes_only_into_the_git_ignored_folder(monkeypatch, tmp_path, capsys):
    fake_benchmark(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)  # as in the repository
    assert runner.Options().out == Path("benchmarks/local")
    assert cli_main(["bench", "--quick"]) == 0
    files = written(tmp_path)
    assert "benchmarks/local/results.md" in files and "benchmarks/local/decode.md" in files
    assert all(name.startswith("benchmarks/local/") for name in files), files
    assert "wrote benchmarks/local/results.md" in capsys.readouterr().out
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", "benchmarks/local/results.md"], cwd=REPO, check=False
        )
        assert ignored.returncode == 0, "benchmarks/local/ must be in .gitignore"


def test_publish_writes_the_readmes_folder(monkeypatch, tmp_path):
    fake_benchmark(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src" / "multihead").mkdir(parents=True)  # the repository's root
    (tmp_path / "src" / "multihead" / "__init__.py").write_text("")
    assert cli_main(["bench", "--publish"]) == 0
    files = written(tmp_path)
    assert "benchmarks/results/results.md" in files
    assert all(name.startswith("benchmarks/results/") for name in files if "src/" not in name)


def test_decode_summary_says_slower_when_ours_is_slower():
    from multihead.benchmark.decode import _faster

    assert _faster({"speedup": 14.3}) == "ours 14.3x faster"
    assert _faster({"speedup": 0.5}) == "ours 2.0x slower"


def test_encoder_report_is_written(tmp_path, monkeypatch):
    """python -m multihead.benchmark.encoder's files, from fake rows (no timing here)."""
    from multihead.benchmark import encoder

    monkeypatch.setattr(encoder, "gemm_gflops", lambda device: 1.0)
    row = dict(N=2, L=8, E=16, H=4, layers=2, padded=True, fused_ms=2.0, declined_ms=1.0)
    row.update(declined_over_fused=0.5, max_abs_difference=1e-7)
    paths = encoder.write([row], tmp_path)
    assert [p.name for p in paths] == ["encoder.json", "encoder.md"]
    text = paths[1].read_text()
    assert "| 2 | 8 | 16 | 4 | 2 | yes | 2.0 | 1.0 | 0.50 | 1.0e-07 |" in text
    assert "torch threads" in text
