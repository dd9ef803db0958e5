"""functional.py: the SDPA path equals the explicit path; gradients are right (gradcheck)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead
from multihead.functional import attention

INF = float("-inf")


def qkv(n, h, q_len, s_len, d, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)

    return t(n, h, q_len, d), t(n, h, s_len, d), t(n, h, s_len, d)


def random_mask(n, h, q_len, s_len, seed, shape_kind):
    gen = torch.Generator().manual_seed(seed)
    shape = {"full": (n, h, q_len, s_len), "padding": (n, 1, 1, s_len), "2d": (q_len, s_len)}[
        shape_kind
    ]
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    return m.masked_fill(torch.rand(shape, generator=gen) < 0.5, INF)


@settings(max_examples=100)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 3),
    q_len=st.integers(1, 6),
    s_len=st.integers(1, 6),
    d=st.integers(1, 5),
    mask_kind=st.sampled_from([None, "full", "padding", "2d"]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_path_equals_explicit_path(n, h, q_len, s_len, d, mask_kind, is_causal, seed):
    mask = None if mask_kind is None else random_mask(n, h, q_len, s_len, seed, mask_kind)
    inputs = qkv(n, h, q_len, s_len, d, seed, requires_grad=True)
    fast, none = attention(*inputs, mask, is_causal=is_causal, need_weights=False)
    assert none is None
    grads_fast = torch.autograd.grad(fast.sum(), inputs)
    explicit, w = attention(*inputs, mask, is_causal=is_causal, need_weights=True)
    grads_explicit = torch.autograd.grad(explicit.sum(), inputs)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, explicit, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads_fast, grads_explicit, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert w.shape == (n, q_len, s_len)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "full", "padding"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_gradcheck(need_weights, mask_kind, is_causal):
    inputs = qkv(2, 2, 3, 4, 3, seed=5, requires_grad=True)
    mask = None if mask_kind is None else random_mask(2, 2, 3, 4, 9, mask_kind)

    def f(q, k, v):
        out, w = attention(
            q, k, v, mask, is_causal=is_causal, need_weights=need_weights, average_weights=False
        )
        return (out,) if w is None else (out, w)

    assert torch.autograd.gradcheck(f, inputs)
    if need_weights:  # SDPA's CPU flash kernel has no double backward (nor in torch's layer)
        assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(add_bias_kv=True, add_zero_attn=True),
        dict(kdim=3, vdim=5, bias=False),
    ],
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_layer_gradcheck(kwargs, need_weights):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(4, 2, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, layer.kdim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 2, layer.vdim, generator=gen, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False, False, True, False, True], [True] * 5])  # batch 1: empty

    def f(q, k, v, *params):
        out, w = torch.func.functional_call(
            layer,
            dict(zip([n for n, _ in layer.named_parameters()], params, strict=True)),
            (q, k, v),
            dict(key_padding_mask=padding, need_weights=need_weights),
        )
        return (out,) if w is None else (out, w)

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (q, k, v, *params))
