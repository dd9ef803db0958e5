"""The seed example, runnable with our layer or torch's (the test compares the two texts)."""

from __future__ import annotations

import torch
from torch import nn

from .layer import MultiheadAttention


def seed_example(layer_cls: type[nn.Module]) -> str:
    """Runs the seed example with ``layer_cls`` and returns what it prints.

    First the seed tutorial's lines, as its script prints them (``print`` of the shapes and of
    the tensors ``output[0, :2, :4]`` and ``attn_weights[0, :2, :5]``, ``grad_fn`` included):
    ``torch.manual_seed(0)``, E=16, H=4, batch 2, sequence 5, ``batch_first=True``,
    self-attention on ``torch.rand`` inputs. Then one line for each of the seed's two other
    constructions.
    """
    lines = []
    torch.manual_seed(0)
    mha = layer_cls(embed_dim=16, num_heads=4, batch_first=True)
    x = torch.rand(2, 5, 16)  # (N, L, E)
    output, attn_weights = mha(x, x, x)
    # str() is what print() writes; slicing ends both classes' autograd graphs on the same
    # node (grad_fn=<SliceBackward0>), so the tensors print alike.
    lines.append(f"Output shape: {output.shape}")
    lines.append(f"Attention weights shape: {attn_weights.shape}")
    lines.append("Output sample:")
    lines.append(str(output[0, :2, :4]))
    lines.append("Attention weights sample:")
    lines.append(str(attn_weights[0, :2, :5]))

    seq_first = layer_cls(embed_dim=64, num_heads=8)
    y = torch.rand(7, 3, 64)  # (L, N, E)
    out, w = seq_first(y, y, y)
    lines.append(
        f"MultiheadAttention(embed_dim=64, num_heads=8): (L, N, E) {tuple(y.shape)} -> "
        f"output {tuple(out.shape)}, weights {tuple(w.shape)}"
    )
    with_dropout = layer_cls(embed_dim=128, num_heads=4, dropout=0.1, batch_first=True)
    z = torch.rand(3, 6, 128)  # (N, L, E)
    out, w = with_dropout(z, z, z, need_weights=False)
    lines.append(
        "MultiheadAttention(embed_dim=128, num_heads=4, dropout=0.1, batch_first=True): "
        f"(N, L, E) {tuple(z.shape)} -> output {tuple(out.shape)}, weights {w}"
    )
    return "\n".join(lines)


def demo() -> str:
    """What ``python -m multihead demo`` prints: the seed example with our layer, then a line
    saying that torch's layer prints the same text for the same script."""
    return (
        f"{seed_example(MultiheadAttention)}\n"
        f"Printed with multihead.MultiheadAttention (torch {torch.__version__}): "
        "torch.nn.MultiheadAttention prints this same text for the same script."
    )
