"""Attention sinks (issue 12) on the SDPA path: the flash kernel over the real keys with the
sink folded in from the log-sum-exp (functional._SinkFlashAttention) equals the sink as a
masked key slot (the route of every other path), in outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

import multihead
import multihead.functional as functional

TOL = dict(atol=1e-12, rtol=1e-12)


def formula(q, k, v, sinks, is_causal):
    """softmax([q k^T / sqrt(D), sink_h]) without the sink's column, times v (float64)."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        above = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        logits = logits.masked_fill(above, float("-inf"))
    column = sinks.view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.softmax(torch.cat([logits, column], -1), -1)[..., :-1]
    return probs @ v


@pytest.fixture
def flash_calls(monkeypatch):
    calls = []
    original = functional._SinkFlashAttention.apply

    def spy(*args):
        calls.append(args[4])
        return original(*args)

    monkeypatch.setattr(functional._SinkFlashAttention, "apply", spy)
    return calls


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("length", "keys"), [(37, 37), (5, 130)])
def test_flash_route_equals_the_formula_and_the_slot_route(
    is_causal, length, keys, flash_calls, monkeypatch
):
    if is_causal and length != keys:
        keys = length
    gen = torch.Generator().manual_seed(length + keys)
    shape = (2, 4, length, 8)
    q = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, keys, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, keys, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    sinks = (torch.randn(4, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    out, _ = functional.attention(q, k, v, is_causal=is_causal, sinks=sinks)
    assert flash_calls == [is_causal]  # the flash route ran
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v, sinks), g)
    ref = formula(q, k, v, sinks, is_causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), g)
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    monkeypatch.setattr(functional, "_sink_flash", lambda *args: None)  # the slot route
    slot, _ = functional.attention(q, k, v, is_causal=is_causal, sinks=sinks)
    torch.testing.assert_close(out, slot, **TOL)
    for a, b in zip(grads, torch.autograd.grad(slot, (q, k, v, sinks), g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_flash_route_double_backward(flash_calls):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    sinks = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(q, k, v, sinks):
        return functional.attention(q, k, v, is_causal=True, sinks=sinks)[0]

    assert torch.autograd.gradgradcheck(run, (q, k, v, sinks))
    assert flash_calls  # gradgradcheck went through the flash route's create_graph backward


def test_layer_training_call_takes_the_flash_route(flash_calls):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(16, 4, batch_first=True, sinks=True, dtype=torch.float64)
    with torch.no_grad():
        layer.sinks.normal_()
    x = torch.randn(2, 300, 16, dtype=torch.float64, requires_grad=True)
    out, weights = layer(x, x, x, is_causal=True)  # need_weights: sdpa + averaged weights
    assert flash_calls == [True]
    out.sum().backward()
    assert layer.sinks.grad is not None and layer.sinks.grad.abs().sum() > 0
    # The rows' weights (real keys only) plus each head's sink share sum to one.
    assert bool((weights.sum(-1) < 1).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_kv_heads": 2},  # grouped heads: the flash kernel is called per head here
        {"key_padding_mask": True},
        {"window": 3},
    ],
)
def test_other_constraints_take_the_slot_route(kwargs, flash_calls):
    kwargs = dict(kwargs)
    padding = kwargs.pop("key_padding_mask", False)
    layer = multihead.MultiheadAttention(16, 4, batch_first=True, sinks=True, **kwargs)
    x = torch.randn(2, 300, 16, requires_grad=True)
    mask = torch.zeros(2, 300, dtype=torch.bool) if padding else None
    layer(x, x, x, key_padding_mask=mask, need_weights=False, is_causal=True)
    assert flash_calls == []


# -- review findings (each failed before its fix) --------------------------------------------


def test_functional_sinks_keep_the_mask_with_causal_and_a_mod():
    """With a mask, is_causal, a mod and sinks, the mask is kept (it was replaced by the
    causal mask)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, generator=gen, dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.float64)
    mask[:, 0] = float("-inf")  # key 0 hidden from every query
    keep_all = multihead.mods.and_masks(lambda b, h, q_idx, kv_idx: kv_idx >= 0)
    out, w = functional.attention(
        q,
        k,
        v,
        mask,
        is_causal=True,
        mask_mod=keep_all,
        sinks=sinks,
        need_weights=True,
        average_weights=False,
    )
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    full_mask = mask.masked_fill(causal, float("-inf"))
    logits = q @ k.transpose(-1, -2) / 2 + full_mask
    column = sinks.view(1, -1, 1, 1).expand(1, 2, 6, 1)
    ref_w = torch.softmax(torch.cat([logits, column], -1), -1)[..., :-1]
    assert (w[..., 0] == 0).all()
    torch.testing.assert_close(w, ref_w, **TOL)
    torch.testing.assert_close(out, ref_w @ v, **TOL)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_layer_refuses_non_finite_sinks(value):
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, sinks=True)
    with torch.no_grad():
        layer.sinks[1] = value
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"`sinks`.*finite"):
        layer(x, x, x, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`sinks`.*finite"):
        functional.attention(*(torch.randn(1, 2, 3, 4) for _ in range(3)), sinks=layer.sinks)


def test_functional_sinks_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    sinks = torch.randn(2)

    def run(q, k, v, sinks):
        return functional.attention(q, k, v, is_causal=True, sinks=sinks)[0]

    compiled = torch.compile(run, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, sinks), run(q, k, v, sinks))


def test_vmap_over_the_sinks_alone():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    stacked = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    out = torch.vmap(lambda s: functional.attention(q, k, v, sinks=s)[0])(stacked)
    for i in range(3):
        torch.testing.assert_close(out[i], formula(q, k, v, stacked[i], False), **TOL)


def test_canonical_mask_refuses_sinks_without_their_slot():
    with pytest.raises(ValueError, match=r"`sinks`.*extra_keys >= 1"):
        multihead.canonical_mask(
            key_padding_mask=None,
            attn_mask=None,
            is_causal=True,
            batch_size=1,
            num_heads=2,
            query_len=3,
            key_len=3,
            extra_keys=0,
            dtype=torch.float32,
            device=torch.device("cpu"),
            sinks=torch.zeros(2),
        )


# -- edge-case attack findings (each failed before its fix) -----------------------------------


@pytest.mark.parametrize("small_calls_explicit", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_a_row_without_keys_and_nan_in_its_masked_keys_gives_zero_with_sinks(
    small_calls_explicit, need_weights, training, is_causal, monkeypatch
):
    """Its whole weight goes to the sink: output out_proj.bias (attention zero, selected, not
    multiplied), weights zero; the NaN held by its masked keys and values never reaches it."""
    if not small_calls_explicit:
        monkeypatch.setattr(functional, "SMALL_SCORES", 0)
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, sinks=True).train(training)
    with torch.no_grad():
        layer.sinks.normal_()
        layer.out_proj.bias.normal_()
    x = torch.randn(2, 5, 8)
    kv = x.clone()
    kv[1] = float("nan")
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # batch row 1: every key is padding
    out, w = layer(x, kv, kv, key_padding_mask=kpm, need_weights=need_weights, is_causal=is_causal)
    assert torch.equal(out[1], layer.out_proj.bias.expand(5, 8))
    assert torch.isfinite(out[0]).all()
    if need_weights:
        assert torch.equal(w[1], torch.zeros_like(w[1])) and torch.isfinite(w).all()


def test_functional_sinks_that_overflow_the_query_dtype_are_refused():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"`sinks`.*finite"):
        functional.attention(q, k, v, sinks=torch.tensor([1e300, 0.0], dtype=torch.float64))
    half = [t.half() for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"`sinks`.*finite"):
        functional.attention(*half, sinks=torch.tensor([7e4, 0.0]))


def test_a_zero_token_call_on_a_rolling_cache_changes_nothing():
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, window=3, sinks=True).eval()
    cache = layer.new_cache(1, 3, rolling=True, sink_tokens=1)
    x = torch.randn(1, 4, 8)
    empty = torch.randn(1, 0, 8)
    with torch.no_grad():
        layer(x, x, x, cache=cache)
        before = [b.clone() for b in cache.buffers()]
        out, w = layer(empty, empty, empty, cache=cache)
    assert out.shape == (1, 0, 8) and w.shape[1] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, cache.buffers(), strict=True))


@pytest.mark.parametrize("rolling", [False, True])
def test_a_gate_of_another_dtype_is_refused_before_the_cache_changes(rolling):
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, window=3, output_gate=True)
    layer.eval()
    cache = layer.new_cache(1, 8 if not rolling else 3, rolling=rolling)
    x = torch.randn(1, 2, 8)
    with torch.no_grad():
        layer(x, x, x, cache=cache)
        before = [b.clone() for b in cache.buffers()]
        layer.gate_proj.double()
        with pytest.raises(TypeError, match=r"`gate_proj.weight`.*dtype torch.float32"):
            layer(x, x, x, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.buffers(), strict=True))
