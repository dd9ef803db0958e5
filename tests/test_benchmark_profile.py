"""python -m multihead.benchmark.profile: per-op self CPU time, ours against torch."""

from __future__ import annotations

from multihead.benchmark import profile
from multihead.benchmark.cases import Case


def test_profile_tables_name_ops_for_both_layers(tmp_path):
    case = Case("infer_weights", 1, 8, 16, 2)
    per_op = profile.profile_case(case, calls=1)
    assert any(op.startswith("aten::") for op in per_op)
    assert sum(times["ours"] for times in per_op.values()) > 0
    assert sum(times["torch"] for times in per_op.values()) > 0
    text = profile.table(case, per_op, top=3)
    assert text.count("\n| `") == 3 and "**total**" in text
    assert "infer_weights, N1 L8 E16 H2" in text


def test_floor_minimal_call_is_the_default_call_and_rows_have_ratios():
    import pytest
    import torch

    from multihead.benchmark import floor
    from multihead.benchmark.workload import build_input, build_layers

    case = Case("infer_weights", 2, 6, 16, 4)
    ours, _ = build_layers(case, torch.device("cpu"))
    x = build_input(case, torch.device("cpu"))
    out, weights = floor.minimal_call(ours, x)()
    with torch.no_grad():
        ref, ref_weights = ours(x, x, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)
    (row,) = floor.run([(2, 5)], budget_s=0.05)
    assert row["case"] == "infer_weights N2 L5 E16 H4"
    assert row["ours_ms"] > 0 and row["minimal_over_torch"] > 0
    assert "| infer_weights N2 L5 E16 H4 |" in floor.table([row])
    with pytest.raises(SystemExit):
        floor.main(["2:x"])
