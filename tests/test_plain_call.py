"""The layer's plain-call shortcut (``MultiheadAttention._forward_plain``): ``mha(x, x, x)``
with no mask, on a layer with no option beyond torch's, at most ``SMALL_SCORES`` scores.

It skips the per-call validation and the mask description and runs
:func:`multihead.functional.packed_self_attention`. These tests prove that it computes what the
full path computes (outputs, weights, gradients, dropout draws), that it is taken exactly
when it should be, and that every call it stands aside for (bad input included) gets the full
path's result or error.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import multihead
import multihead.functional
import multihead.layer
from multihead.functional import SMALL_SCORES


@contextlib.contextmanager
def plain_calls():
    """Yields a list that gets one entry per call the shortcut ran."""
    seen: list[int] = []
    real = multihead.layer.packed_self_attention

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multihead.layer, "packed_self_attention", spy)
        yield seen


@contextlib.contextmanager
def shortcut_off():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multihead.MultiheadAttention, "_forward_plain", lambda *args: None)
        yield


def tolerance(dtype: torch.dtype) -> dict:
    return dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)


def run(layer, x, grad: bool, **kwargs):
    """One call: output, weights and (with grad) the gradients of x and every parameter."""
    x = x.detach().clone().requires_grad_(grad)
    layer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out, weights = layer(x, x, x, **kwargs)
        grads = []
        if grad:
            loss = out.square().sum() + (0 if weights is None else weights.sin().sum())
            loss.backward()
            grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out, weights, grads


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 5),
    batch_first=st.booleans(),
    bias=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    grad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    dropout=st.sampled_from([0.0, 0.3]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_shortcut_equals_the_full_path(
    batch,
    length,
    heads,
    head_dim,
    batch_first,
    bias,
    need_weights,
    average,
    grad,
    dtype,
    dropout,
    training,
    seed,
):
    torch.manual_seed(seed)
    embed = heads * head_dim
    layer = multihead.MultiheadAttention(
        embed, heads, dropout=dropout, bias=bias, batch_first=batch_first, dtype=dtype
    ).train(training)
    shape = (batch, length, embed) if batch_first else (length, batch, embed)
    x = torch.randn(shape, dtype=dtype)
    kwargs = dict(need_weights=need_weights, average_attn_weights=average)
    torch.manual_seed(seed + 1)  # the same dropout draws on both sides
    with plain_calls() as seen:
        fast = run(layer, x, grad, **kwargs)
    assert seen == [1], "the shortcut was not taken"
    torch.manual_seed(seed + 1)
    with shortcut_off():
        full = run(layer, x, grad, **kwargs)
    tol = tolerance(dtype)
    torch.testing.assert_close(fast[0], full[0], **tol)
    if need_weights:
        torch.testing.assert_close(fast[1], full[1], **tol)
    else:
        assert fast[1] is None and full[1] is None
    for a, b in zip(fast[2], full[2], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_the_shortcut_matches_torch_in_float64():
    """The seed example's shape against torch's own layer, every weights option."""
    torch.manual_seed(0)
    ours = multihead.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for need_weights in (True, False):
        for average in (True, False):
            kwargs = dict(need_weights=need_weights, average_attn_weights=average)
            with plain_calls() as seen:
                out, weights = ours(x, x, x, **kwargs)
            assert seen == [1]
            ref, ref_weights = theirs(x, x, x, **kwargs)
            torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)
            if need_weights:
                torch.testing.assert_close(weights, ref_weights, atol=1e-14, rtol=0)


def test_the_shortcut_gradgradcheck():
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        out, weights = layer(x, x, x)
        return out, weights

    with plain_calls() as seen:
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
    assert seen


# Calls the shortcut must stand aside for: each changes the math, or needs the checks.
def _layer(**options):
    torch.manual_seed(0)
    return multihead.MultiheadAttention(8, 2, batch_first=True, **options)


X = torch.randn(2, 3, 8)
STAND_ASIDE = {
    "num_kv_heads": (lambda: _layer(num_kv_heads=1), {}),
    "rope": (lambda: _layer(rope=True), {}),
    "qk_norm": (lambda: _layer(qk_norm=True), {}),
    "window": (lambda: _layer(window=1), {}),
    "softcap": (lambda: _layer(softcap=1.0), {}),
    "add_bias_kv": (lambda: _layer(add_bias_kv=True), {}),
    "add_zero_attn": (lambda: _layer(add_zero_attn=True), {}),
    "attn_mask": (lambda: _layer(), dict(attn_mask=torch.ones(3, 3, dtype=torch.bool).triu(1))),
    "key_padding_mask": (
        lambda: _layer(),
        dict(key_padding_mask=torch.tensor([[False, False, True]] * 2)),
    ),
    "is_causal": (lambda: _layer(), dict(is_causal=True)),
    "segment_ids": (lambda: _layer(), dict(segment_ids=torch.tensor([[0, 0, 1]] * 2))),
    "mask_mod": (lambda: _layer(), dict(mask_mod=multihead.mods.causal)),
    "score_mod": (lambda: _layer(), dict(score_mod=lambda s, b, h, q, k: s * 2)),
}


@pytest.mark.parametrize("name", sorted(STAND_ASIDE))
def test_the_shortcut_stands_aside_for_options_and_masks(name):
    make, kwargs = STAND_ASIDE[name]
    layer = make()
    with plain_calls() as seen:
        out, _ = layer(X, X, X, **kwargs)
    assert seen == [], f"the shortcut ran with {name}"
    with shortcut_off():
        ref, _ = layer(X, X, X, **kwargs)
    assert torch.equal(out, ref)


def test_the_shortcut_stands_aside_for_a_mutated_option():
    """Options are read on every call, not cached: setting one after construction counts."""
    layer = _layer()
    layer.softcap = 0.5
    with plain_calls() as seen:
        layer(X, X, X)
    assert seen == []


def test_the_shortcut_stands_aside_above_small_scores_and_for_empty_calls():
    layer = multihead.MultiheadAttention(8, 2, batch_first=True)
    big = torch.randn(1, 91, 8)  # 2 * 91 * 91 > SMALL_SCORES
    assert 2 * 91 * 91 > SMALL_SCORES
    for x in (big, torch.randn(0, 3, 8), torch.randn(2, 0, 8)):
        with plain_calls() as seen:
            layer(x, x, x)
        assert seen == []


def test_the_shortcut_stands_aside_for_cross_attention_unbatched_and_subclasses():
    layer = _layer()
    y = X.clone()
    param = nn.Parameter(X.clone())
    with plain_calls() as seen, torch.no_grad():
        layer(X, y, y)
        layer(X[0], X[0], X[0])
        layer(param, param, param)
    assert seen == []


def test_the_shortcut_stands_aside_under_autocast():
    layer = _layer()
    with plain_calls() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(X, X, X)
    assert seen == [] and out.dtype == torch.bfloat16


def test_the_shortcut_stands_aside_for_replaced_parameters():
    """weight_norm and parametrizations take in_proj_weight out of _parameters: the full
    path reads the computed weight."""
    layer = _layer()
    with torch.no_grad():
        ref, _ = layer(X, X, X)
    torch.nn.utils.parametrize.register_parametrization(layer, "in_proj_weight", _Double())
    with plain_calls() as seen, torch.no_grad():
        out, _ = layer(X, X, X)
    assert seen == []
    assert not torch.allclose(out, ref)  # the doubled weight was used


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.randn(2, 3, 7), ValueError, "embed_dim"),
        (torch.randn(2, 3, 8, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(3, 8, 2, 1), ValueError, "query"),
    ],
)
def test_bad_input_gets_the_full_paths_error(bad, error, match):
    layer = _layer()
    with plain_calls() as seen, pytest.raises(error, match=match):
        layer(bad, bad, bad)
    assert seen == []


def test_a_parameter_of_another_dtype_gets_the_full_paths_error():
    layer = _layer()
    layer.in_proj_weight.data = layer.in_proj_weight.data.double()
    with pytest.raises(TypeError, match=r"in_proj_weight"):
        layer(X, X, X)


def test_an_added_parameter_of_another_dtype_gets_the_same_error_at_every_size():
    """The full path checks the dtype of every registered parameter: a parameter added to the
    layer or to out_proj (an adapter) sends the call there, small or large."""
    for owner in ("layer", "out_proj"):
        layer = _layer().to(torch.bfloat16)
        target = layer if owner == "layer" else layer.out_proj
        target.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 8)))  # float32
        for length in (3, 100):
            x = torch.randn(2, length, 8, dtype=torch.bfloat16)
            with pytest.raises(TypeError, match=r"lora_A"):
                layer(x, x, x)
