"""The main job: the seed example prints torch's text with our layer."""

from __future__ import annotations

import torch

import multihead
from multihead.__main__ import main
from multihead.demo import seed_example


def test_seed_example_prints_torchs_text():
    ours = seed_example(multihead.MultiheadAttention)
    theirs = seed_example(torch.nn.MultiheadAttention)
    assert ours == theirs
    assert "output shape: (2, 5, 16)" in ours
    assert "attn_weights shape: (2, 5, 5)" in ours


def test_demo_command(capsys):
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert seed_example(multihead.MultiheadAttention) in printed
