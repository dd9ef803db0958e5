"""The seed example, runnable with our layer or torch's (the test compares the two texts)."""

from __future__ import annotations

import torch
from torch import nn


def seed_example(layer_cls: type[nn.Module]) -> str:
    """Runs the seed example with ``layer_cls`` and returns what it prints.

    ``torch.manual_seed(0)``, E=16, H=4, batch 2, sequence 5, ``batch_first=True``,
    self-attention on ``torch.rand`` inputs; then the seed's two other constructions.
    """
    lines = []
    torch.manual_seed(0)
    mha = layer_cls(embed_dim=16, num_heads=4, batch_first=True)
    x = torch.rand(2, 5, 16)  # (N, L, E)
    output, attn_weights = mha(x, x, x)
    lines.append(f"output shape: {tuple(output.shape)}")
    lines.append(f"attn_weights shape: {tuple(attn_weights.shape)}")
    lines.append(f"output[0, :2, :4]:\n{output[0, :2, :4].detach()}")
    lines.append(f"attn_weights[0, :2, :5]:\n{attn_weights[0, :2, :5].detach()}")

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
