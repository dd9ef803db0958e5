"""torch's TransformerEncoderLayer / TransformerDecoderLayer with our attention swapped in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import multihead

D_MODEL, HEADS = 16, 4


def swapped(layer: nn.Module, names: list[str]) -> nn.Module:
    ours = copy.deepcopy(layer)
    for name in names:
        old = getattr(layer, name)
        new = multihead.MultiheadAttention(
            old.embed_dim,
            old.num_heads,
            dropout=old.dropout,
            batch_first=old.batch_first,
            dtype=old.in_proj_weight.dtype,
        )
        new.load_state_dict(old.state_dict(), strict=True)
        setattr(ours, name, new)
    return ours


# torch itself warns that the bool padding mask and float src_mask differ in type.
@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_encoder_layer(batch_first, norm_first, masked):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    ).double()
    ours = swapped(theirs, ["self_attn"])
    assert isinstance(ours.self_attn, multihead.MultiheadAttention)
    src = torch.randn((3, 6, D_MODEL) if batch_first else (6, 3, D_MODEL), dtype=torch.float64)
    kwargs = {}
    if masked:
        kwargs = dict(
            src_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64),
            src_key_padding_mask=torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 6]),
            is_causal=True,
        )
    src_ours = src.clone().requires_grad_()
    src_theirs = src.clone().requires_grad_()
    out, ref = ours(src_ours, **kwargs), theirs(src_theirs, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(src_ours.grad, src_theirs.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_decoder_layer(batch_first, masked):
    torch.manual_seed(1)
    theirs = nn.TransformerDecoderLayer(
        D_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first
    ).double()
    ours = swapped(theirs, ["self_attn", "multihead_attn"])
    shape = (lambda n, s: (n, s, D_MODEL)) if batch_first else (lambda n, s: (s, n, D_MODEL))
    tgt = torch.randn(shape(2, 5), dtype=torch.float64)
    memory = torch.randn(shape(2, 7), dtype=torch.float64)
    kwargs = {}
    if masked:
        kwargs = dict(
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64),
            memory_key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2]),
            tgt_is_causal=True,
        )
    out, ref = ours(tgt, memory, **kwargs), theirs(tgt, memory, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
