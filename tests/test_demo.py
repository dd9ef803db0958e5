"""The main job: the seed example prints torch's text with our layer."""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead.__main__ import main
from multihead.demo import seed_example

LAYERS = [torch.nn.MultiheadAttention, multihead.MultiheadAttention]


def tutorial(layer_cls: type[torch.nn.Module], capsys) -> str:
    """What the seed tutorial's script prints with ``layer_cls``, written as the tutorial is."""
    torch.manual_seed(0)
    mha = layer_cls(embed_dim=16, num_heads=4, batch_first=True)
    x = torch.rand(2, 5, 16)
    output, attn_weights = mha(x, x, x)
    print("Output shape:", output.shape)
    print("Attention weights shape:", attn_weights.shape)
    print("Output sample:")
    print(output[0, :2, :4])
    print("Attention weights sample:")
    print(attn_weights[0, :2, :5])
    return capsys.readouterr().out


def test_seed_example_prints_torchs_text():
    ours = seed_example(multihead.MultiheadAttention)
    theirs = seed_example(torch.nn.MultiheadAttention)
    assert ours == theirs
    assert ours.splitlines()[:2] == [
        "Output shape: torch.Size([2, 5, 16])",
        "Attention weights shape: torch.Size([2, 5, 5])",
    ]


@pytest.mark.parametrize("layer_cls", LAYERS, ids=["torch", "multihead"])
def test_seed_example_starts_with_the_tutorials_text(layer_cls, capsys):
    printed = tutorial(torch.nn.MultiheadAttention, capsys)
    # The tutorial's script prints the same text with either layer, grad_fn included.
    assert tutorial(multihead.MultiheadAttention, capsys) == printed
    assert (seed_example(layer_cls) + "\n").startswith(printed)


def test_demo_command(capsys):
    printed = tutorial(torch.nn.MultiheadAttention, capsys)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Output shape: torch.Size([2, 5, 16])"
    assert out.startswith(printed)
    assert out.startswith(seed_example(torch.nn.MultiheadAttention) + "\n")
    assert out.splitlines()[-1].endswith(
        "torch.nn.MultiheadAttention prints this same text for the same script."
    )
