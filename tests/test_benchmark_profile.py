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
