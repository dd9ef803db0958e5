"""Differential tests against torch.nn.MultiheadAttention in float64 (the oracle).

Each hypothesis example draws a construction and a call (every constructor option, batched or
not, every mask kind, both need_weights and average settings, is_causal with its mask, train or
eval with dropout 0) and checks init, outputs, weights and every gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import configs, make_inputs, make_layers, make_masks
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead.functional

TOL = dict(atol=1e-10, rtol=1e-10)


def torch_is_causal(cfg) -> bool:
    """The is_causal to give torch so that it computes our documented semantics.

    With need_weights=False and no key_padding_mask, torch drops attn_mask and hands
    is_causal to SDPA, whose causal mask then also hides the add_bias_kv / add_zero_attn slots
    from early queries. Everywhere else torch keeps those slots attendable, and so do we
    (README, "Differences"). There we give torch is_causal=False with the causal attn_mask.
    """
    extra = cfg.add_bias_kv or cfg.add_zero_attn
    drops_mask = not cfg.need_weights and cfg.key_padding_mask is None
    return cfg.is_causal and not (extra and drops_mask)


def run(layer, cfg, inputs, masks, is_causal=None):
    kpm, attn = masks
    with warnings.catch_warnings():
        # torch warns that mixing bool and float masks is deprecated; we accept the mix.
        warnings.simplefilter("ignore")
        return layer(
            *inputs,
            key_padding_mask=kpm,
            need_weights=cfg.need_weights,
            attn_mask=attn,
            average_attn_weights=cfg.average_attn_weights,
            is_causal=cfg.is_causal if is_causal is None else is_causal,
        )


def leaves(inputs):
    unique = []
    for x in inputs:
        if not any(x is u for u in unique):
            unique.append(x)
    return unique


@contextlib.contextmanager
def small_call_shortcut(enabled: bool):
    """With ``enabled=False``, tiny calls take the paths that large calls take."""
    with pytest.MonkeyPatch.context() as mp:
        if not enabled:
            mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        yield


@settings(max_examples=1000)
@given(cfg=configs(), small_calls_explicit=st.booleans())
def test_matches_torch(cfg, small_calls_explicit, record_error, count_case):
    """Half the examples turn the small-call shortcut off, so that tiny shapes also run the
    SDPA + recomputed-weights path that large training calls take."""
    with small_call_shortcut(small_calls_explicit):
        check_against_torch(cfg, record_error, count_case)


def check_against_torch(cfg, record_error, count_case):
    ours, theirs, init_equal = make_layers(cfg)
    assert init_equal, "same seed must give bitwise-equal parameters"
    masks = make_masks(cfg)
    inputs_ours = make_inputs(cfg)
    inputs_theirs = make_inputs(cfg)

    out, w = run(ours, cfg, inputs_ours, masks)
    ref_out, ref_w = run(theirs, cfg, inputs_theirs, masks, is_causal=torch_is_causal(cfg))

    count_case("vs torch: forward + backward")
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **TOL)
    record_error("vs torch: output", out, ref_out)
    if cfg.need_weights:
        assert w.shape == ref_w.shape
        torch.testing.assert_close(w, ref_w, **TOL)
        record_error("vs torch: weights", w, ref_w)
    else:
        assert w is None and ref_w is None

    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    loss = (out * g_out).sum()
    ref_loss = (ref_out * g_out).sum()
    if cfg.need_weights:
        g_w = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        loss = loss + (w * g_w).sum()
        ref_loss = ref_loss + (ref_w * g_w).sum()
    loss.backward()
    ref_loss.backward()
    for a, b in zip(leaves(inputs_ours), leaves(inputs_theirs), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
        record_error("vs torch: input grads", a.grad, b.grad)
    ref_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=name)
        record_error("vs torch: parameter grads", p.grad, ref_params[name].grad)


def fast_path_configs():
    """Calls that torch sends through its native inference fast path: batched, batch_first,
    self-attention, packed weights with biases, even heads, no bias_kv / zero_attn, and bool
    masks or none."""

    def eligible(cfg):
        return replace(
            cfg,
            num_heads=2 * ((cfg.num_heads + 1) // 2),
            bias=True,
            kdim=None,
            vdim=None,
            add_bias_kv=False,
            add_zero_attn=False,
            batched=True,
            batch_first=True,
            sharing="self",
            key_len=cfg.query_len,
            key_padding_mask=cfg.key_padding_mask and "bool",
            attn_mask=cfg.attn_mask and cfg.attn_mask.replace("float", "bool"),
            training=False,
        )

    return configs().map(eligible)


@settings(max_examples=150)
@given(cfg=fast_path_configs(), small_calls_explicit=st.booleans())
def test_matches_torch_fast_path_in_inference(cfg, small_calls_explicit, record_error, count_case):
    """eval + no_grad: torch answers through torch._native_multi_head_attention. Half the
    examples send our tiny calls through the blockwise path that large calls take."""
    with small_call_shortcut(small_calls_explicit):
        check_against_torch_fast_path(cfg, record_error, count_case)


def check_against_torch_fast_path(cfg, record_error, count_case):
    ours, theirs, _ = make_layers(cfg)
    masks = make_masks(cfg)
    x = make_inputs(cfg)[0].detach()
    with torch.no_grad():
        out, w = run(ours, cfg, (x, x, x), masks)
        with torch.autograd.profiler.profile() as prof:
            ref_out, ref_w = run(theirs, cfg, (x, x, x), masks)
    assert any("_native_multi_head_attention" in e.name for e in prof.function_events)
    count_case("vs torch: inference fast path")
    torch.testing.assert_close(out, ref_out, **TOL)
    record_error("vs torch: output", out, ref_out)
    if cfg.need_weights:
        torch.testing.assert_close(w, ref_w, **TOL)
        record_error("vs torch: weights", w, ref_w)


@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_consumes_the_same_random_numbers_as_torch(batch_first):
    """With need_weights=True our dropout draws exactly what torch's draws, so under one seed
    training with dropout gives torch's numbers, and the weights are the ones after dropout."""
    from helpers import Config

    cfg = Config(num_heads=2, head_dim=3, batch_first=batch_first, query_len=5, key_len=5)
    ours, theirs, _ = make_layers(cfg)
    ours.dropout = theirs.dropout = 0.3
    inputs = [x.detach() for x in make_inputs(cfg)]
    torch.manual_seed(123)
    out, w = ours(*inputs, average_attn_weights=False)
    torch.manual_seed(123)
    ref_out, ref_w = theirs(*inputs, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    assert (w == 0).any(), "dropout at p=0.3 over 150 weights zeroes some"
