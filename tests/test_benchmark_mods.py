"""The mask-mod benchmark section (multihead.benchmark.mods) at tiny sizes: tile counts, the
target checks, the report files and the memory subprocess. Nothing here asserts on timings."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from multihead.__main__ import main as cli_main
from multihead.benchmark import mods as bench_mods
from multihead.benchmark import runner

# L 256 in 128-tiles: a 2 x 2 grid. Small heads keep every call in milliseconds.
TINY = replace(
    bench_mods.FULL,
    seq_len=256,
    embed_dim=32,
    heads=2,
    window=32,
    documents=2,
    budget_s=0.01,
    flex=False,
    memory=False,
)
CPU = torch.device("cpu")
MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "torch_version": "2.x"}


@pytest.mark.parametrize(
    ("case", "tiles", "pairs"),
    [
        ("causal", 3, (256 * 257 // 2)),  # the tile above the diagonal is hidden
        ("window", 3, 256 * 32 - 32 * 31 // 2),  # window 32 reaches back into the lower tile
        ("document", 2, 2 * 128 * 128),  # documents of 128 = the tiles on the diagonal
    ],
)
def test_visible_tiles_count_the_tiles_with_a_visible_pair(case, tiles, pairs):
    mod = bench_mods.mask_mod(case, TINY, CPU)
    visible = bench_mods.dense_visible(mod, TINY, CPU)  # (L, S)
    assert visible.shape == (256, 256) and visible.dtype == torch.bool
    assert int(visible.sum()) == pairs
    assert bench_mods.visible_tiles(visible, 128) == tiles


def test_visible_tiles_pad_a_partial_tile():
    visible = torch.zeros(130, 5, dtype=torch.bool)
    visible[129, 4] = True
    assert bench_mods.visible_tiles(visible, 128) == 1
    visible[0, 0] = True
    assert bench_mods.visible_tiles(visible, 128) == 2


def test_contenders_follow_the_case_mode_and_flex_switch():
    flex = replace(TINY, flex=True)
    assert bench_mods.contenders("causal", "infer", flex) == (
        "ours",
        "ours_is_causal",
        "dense",
        "flex",
    )
    assert bench_mods.contenders("window", "train", flex) == ("ours", "dense")  # flex: no bwd
    assert bench_mods.contenders("window", "infer", TINY) == ("ours", "dense")


def test_quick_and_full_sizes():
    assert (bench_mods.FULL.seq_len, bench_mods.FULL.embed_dim, bench_mods.FULL.heads) == (
        8192,
        512,
        8,
    )
    assert (bench_mods.FULL.window, bench_mods.FULL.documents) == (512, 8)  # 8 x 1024 tokens
    quick = bench_mods.config_for(quick=True, budget_s=None, memory=True)
    assert quick.seq_len == 2048 and quick.window == 128 and quick.documents == 4
    assert quick.budget_s == 1.5 and not quick.flex_memory
    assert bench_mods.config_for(quick=False, budget_s=3.0, memory=False).budget_s == 3.0


def fake_row(case: str, mode: str, ours_over_dense: float, mem: float) -> dict:
    row = {"case": case, "mode": mode, "N": 1, "H": 8, "L": 8192, "S": 8192, "D": 64}
    row.update(visible_tiles=10, total_tiles=16, rounds=5, ours_ms=1.0, dense_ms=2.0)
    row.update(ours_over_dense=ours_over_dense, ours_mem_over_dense=mem, ours_us_per_tile=1.0)
    if mode == "infer":
        row.update(flex_ms=1.0, ours_over_flex=1.6)
    return row


def test_targets_pass_and_miss():
    rows = [
        fake_row("window", "infer", 0.2, 0.5),
        fake_row("document", "train", 0.31, 1.2),
        {**fake_row("causal", "infer", 0.9, 1.0), "ours_is_causal_over_flex": 1.0},
    ]
    checks = {(c["case"], c["mode"], c["key"]): c["pass"] for c in bench_mods.targets(rows)}
    assert checks == {
        ("window", "infer", "ours_over_dense"): True,  # <= 0.25
        ("window", "infer", "ours_over_flex"): False,  # 1.6 > 1.5
        ("window", "infer", "ours_mem_over_dense"): True,
        ("document", "train", "ours_over_dense"): False,  # > 0.30
        ("document", "train", "ours_mem_over_dense"): False,
        ("causal", "infer", "ours_over_flex"): False,  # causal has no dense-time target
        ("causal", "infer", "ours_mem_over_dense"): True,  # equal is within
        ("causal", "infer", "ours_is_causal_over_flex"): True,
    }


def test_report_shows_flex_columns_and_targets(tmp_path):
    rows = [fake_row("window", "infer", 0.2, 0.5), fake_row("causal", "train", 0.9, 1.0)]
    rows[1].update(ours_is_causal_ms=0.5, ours_is_causal_over_dense=0.4, note="a note")
    paths = bench_mods.write(rows, MACHINE, bench_mods.FULL, tmp_path)
    assert [p.name for p in paths] == ["mods.md", "mods.json"]
    text = paths[0].read_text()
    assert "| window | infer | 10/16 | 1 | 1 | 2 | 0.20 | 1 | 1.60 |" in text
    assert "| causal (mask_mod) | train |" in text and "| causal (is_causal) | train |" in text
    assert "ours time / dense mask <= 0.25 | 0.20 | pass |" in text
    assert "ours time / compiled flex forward <= 1.5 | 1.60 | miss |" in text
    assert "outside the timed region" in text and "NotImplementedError" in text
    assert "Test CPU" in text and "torch 2.x" in text and "- causal train: a note" in text
    data = json.loads(paths[1].read_text())
    assert data["all_pass"] is False
    assert data["targets"] == {
        "ours_over_dense": {"window": 0.25, "document": 0.3},
        "ours_over_flex": 1.5,
        "mem_over_dense": 1.0,
    }


def test_the_section_runs_and_writes_its_files(tmp_path, monkeypatch, capsys):
    """python -m multihead.benchmark.mods at L 256, without flex (a compile takes ~7 s) and
    memory (tested below)."""
    monkeypatch.setattr(bench_mods, "gemm_gflops", lambda device: 1.0)
    argv = ["--out", str(tmp_path), "--no-flex", "--no-memory", "--budget", "0.01"]
    argv += ["--seq-len", "256", "--embed-dim", "32", "--heads", "2", "--window", "32"]
    assert bench_mods.main([*argv, "--documents", "2"]) == 0
    assert "wrote " in capsys.readouterr().out
    data = json.loads((tmp_path / "mods.json").read_text())
    assert set(data) == {"machine", "config", "targets", "checks", "all_pass", "rows"}
    assert data["config"]["seq_len"] == 256 and data["config"]["flex"] is False
    rows = {(row["case"], row["mode"]): row for row in data["rows"]}
    assert set(rows) == {(c, m) for c in bench_mods.CASES for m in bench_mods.MODES}
    for (case, mode), row in rows.items():
        assert not row["note"].startswith("error"), row["note"]
        assert row["rounds"] >= bench_mods.MIN_ROUNDS
        for key in ("ours_ms", "dense_ms", "ours_over_dense", "ours_us_per_tile"):
            assert row[key] > 0, (case, mode, key)
        assert "flex_ms" not in row and "ours_mib" not in row
        assert ("ours_is_causal_over_dense" in row) == (case == "causal")
        if mode == "infer":
            assert row["ours_max_abs_diff"] < 1e-4  # ours computes what the dense mask does
        else:
            assert bench_mods.FLEX_NO_TRAIN not in row["note"]  # flex was not asked for
    assert rows["causal", "infer"]["visible_tiles"] == 3
    assert {c["key"] for c in data["checks"]} == {"ours_over_dense"}
    assert "## Targets" in (tmp_path / "mods.md").read_text()


def test_memory_subprocess_on_a_small_case():
    # L 4096 E 64: the call allocates about 5 MiB of fresh pages. At L 256 E 32 it fit in memory
    # the process already held, and the peak it added read 0.0 in about 1 run in 6.
    config = replace(TINY, memory=True, seq_len=4096, embed_dim=64)
    assert bench_mods.measure("window", "train", "ours", config, timeout_s=120) > 1.0


def test_bench_runs_the_section_unless_told_not_to(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(runner, "write_tables", lambda rows, machine, out: [])
    monkeypatch.setattr(runner, "write_plots", lambda rows, machine, out: [])
    monkeypatch.setattr(runner, "machine_info", lambda device, gemm: dict(MACHINE))
    monkeypatch.setattr(runner, "gemm_gflops", lambda device: 1.0)
    monkeypatch.setattr(bench_mods, "run", lambda config: ran.append(config) or [])
    options = runner.Options(quick=True, out=tmp_path, modes=(), decode=False)
    runner.run(options)
    assert [config.seq_len for config in ran] == [2048]
    assert (tmp_path / "mods.md").exists()
    runner.run(replace(options, mods=False))
    assert len(ran) == 1


def test_publish_refuses_no_mods(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", "--publish", "--no-mods"]) == 2
    assert "drop --no-mods" in capsys.readouterr().err
