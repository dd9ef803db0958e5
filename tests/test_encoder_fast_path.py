"""torch's TransformerEncoder(Layer) inference fast path and nested-tensor inputs.

torch's encoder layer, in eval under no_grad, may run its fused kernel from the attention's
``in_proj_weight`` without calling the attention's forward. A layer whose options change the
math must decline it (a no-op forward pre-hook on every layer of ours is torch's signal to
decline; ours decline it all, plain ones included, a measured choice), and torch's encoder
may hand the attention a nested tensor (a padded batch without its padding), which our layer
runs sequence by sequence.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import multihead

E, H, FF = 16, 4, 32
TOL = dict(atol=1e-10, rtol=1e-10)
# Options beyond torch's that change the math; each must keep torch's fused kernel away.
BEYOND_TORCH = [
    dict(num_kv_heads=2),
    dict(num_kv_heads=1),
    dict(rope=True),
    dict(window=2),
    dict(qk_norm=True),
    dict(softcap=0.5),
    dict(rope=True, num_kv_heads=2, qk_norm=True, softcap=3.0, window=3),
]


def encoder_layer(options: dict, seed: int = 0) -> nn.TransformerEncoderLayer:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    layer.self_attn = multihead.MultiheadAttention(E, H, batch_first=True, **options)
    with torch.no_grad():  # non-zero biases and norms, so nothing cancels by accident
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer.double().eval()


def forbid_fused_kernel(monkeypatch) -> None:
    def fused(*args, **kwargs):
        raise AssertionError("torch's fused encoder kernel ran on our layer")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)


def unfused(module: nn.Module, *args, **kwargs):
    """The module run with torch's fast path off: every attention through its forward."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return module(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@pytest.mark.parametrize("options", BEYOND_TORCH, ids=str)
def test_layers_that_change_the_math_decline_the_fused_encoder_kernel(options, monkeypatch):
    forbid_fused_kernel(monkeypatch)
    layer = encoder_layer(options)
    assert layer.self_attn._qkv_same_embed_dim is True  # torch's meaning: packed weights
    x = torch.randn(3, 7, E, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        expected = unfused(layer, x)
    torch.testing.assert_close(out, expected, **TOL)
    if "num_kv_heads" in options:
        return  # torch's fused kernel cannot even read these weights
    # And those options do change the result: the plain layer differs.
    plain = encoder_layer({})
    plain.load_state_dict(layer.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(unfused(plain, x), expected, atol=1e-6)


@pytest.mark.parametrize("options", BEYOND_TORCH, ids=str)
def test_whole_encoder_with_padding_declines_and_runs_nested_inputs(options, monkeypatch):
    """nn.TransformerEncoder turns a padded batch into a nested tensor (its use_nested_tensor
    was decided by torch's own layer at construction); our layer then gets nested inputs."""
    forbid_fused_kernel(monkeypatch)
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), num_layers=2
    )
    for i, layer in enumerate(encoder.layers):
        torch.manual_seed(10 + i)
        layer.self_attn = multihead.MultiheadAttention(E, H, batch_first=True, **options)
    encoder = encoder.double().eval()
    lengths = [7, 4, 1]
    x = torch.randn(3, 7, E, dtype=torch.float64)
    padding = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=padding)
        for b, n in enumerate(lengths):  # each sequence alone, unpadded, through our forward
            alone = unfused(encoder, x[b : b + 1, :n])
            torch.testing.assert_close(out[b, :n], alone[0], **TOL)
        assert (out[padding] == 0).all()  # torch's encoder pads its nested output with zeros


@settings(max_examples=25)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    need_weights=st.booleans(),
    average=st.booleans(),
    is_causal=st.booleans(),
)
def test_nested_inputs_equal_each_sequence_run_alone(lengths, need_weights, average, is_causal):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    seqs = [torch.randn(n, E, dtype=torch.float64) for n in lengths]
    x = torch.nested.nested_tensor(seqs)
    with torch.no_grad():
        out, weights = layer(
            x,
            x,
            x,
            need_weights=need_weights,
            average_attn_weights=average,
            is_causal=is_causal,
        )
        assert out.is_nested and (weights is None) == (not need_weights)
        for i, seq in enumerate(seqs):
            ref, ref_w = layer(
                seq,
                seq,
                seq,
                need_weights=need_weights,
                average_attn_weights=average,
                is_causal=is_causal,
            )
            torch.testing.assert_close(out.unbind()[i], ref, **TOL)
            if need_weights:
                torch.testing.assert_close(weights.unbind()[i], ref_w, **TOL)


def test_swapped_encoder_with_a_hook_on_self_attn_runs_nested_inputs():
    """A forward hook on self_attn (the usual way to read attention maps) refuses the layer's
    fused path, but torch's encoder still converts the padded batch to a nested tensor."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), num_layers=2
    ).double()
    reference = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), num_layers=2
    ).double()
    reference.load_state_dict(model.state_dict())
    assert multihead.swap(model) == 2
    model.eval(), reference.eval()
    seen = []
    model.layers[0].self_attn.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(3, 6, E, dtype=torch.float64)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] + [True] * 5])
    with torch.no_grad():
        out = model(x, src_key_padding_mask=padding)
        expected = unfused(reference, x, src_key_padding_mask=padding)
    assert len(seen) == 1 and seen[0].is_nested  # the hook fired once, on the nested batch
    keep = ~padding
    torch.testing.assert_close(out[keep], expected[keep], **TOL)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda layer, x, y: layer(x, y, y), "query"),  # nested query, dense key / value
        (
            lambda layer, x, y: layer(x, x, x, key_padding_mask=torch.zeros(2, 3)),
            "key_padding_mask",
        ),
        (lambda layer, x, y: layer(x, x, x, attn_mask=torch.zeros(3, 3)), "attn_mask"),
    ],
)
def test_nested_inputs_that_cannot_run_get_a_clear_error(call, name):
    layer = multihead.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    x = torch.nested.nested_tensor([torch.randn(3, E, dtype=torch.float64)] * 2)
    y = torch.randn(2, 3, E, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"Invalid argument `{name}`"):
        call(layer, x, y)
    seq_first = multihead.MultiheadAttention(E, H, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`query`.*batch_first=True"):
        seq_first(x, x, x)


@pytest.mark.parametrize("value", [-1e30, -3e38])
def test_plain_swapped_encoder_keeps_finite_masks_finite(value, monkeypatch):
    """A plain (torch-compatible) layer declines the fused kernel too: a row of a finite float
    mask that torch's fused kernel turns into NaN (measured with torch 2.13) stays finite, and
    equals what our forward gives with the fast path off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).eval()
    multihead.swap(layer)
    forbid_fused_kernel(monkeypatch)
    x = torch.randn(2, 5, E)
    mask = torch.zeros(5, 5)
    mask[2] = value
    padding = torch.zeros(2, 5)
    padding[1] = value
    with torch.no_grad():
        for kwargs in (dict(src_mask=mask), dict(src_key_padding_mask=padding)):
            out = layer(x, **kwargs)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, unfused(layer, x, **kwargs), atol=0, rtol=0)


@pytest.mark.parametrize("how", ["setattr", "add_module", "_modules"])
def test_a_replaced_out_proj_keeps_the_fused_kernel_away(monkeypatch, how):
    """Module replacers swap out_proj through add_module or _modules; the declining hook is
    on a guard child, so the fused kernel still never runs (it would drop RoPE here)."""
    forbid_fused_kernel(monkeypatch)
    layer = encoder_layer(dict(rope=True))
    new = nn.Linear(E, E).double()
    new.load_state_dict(layer.self_attn.out_proj.state_dict())
    if how == "setattr":
        layer.self_attn.out_proj = new
    elif how == "add_module":
        layer.self_attn.add_module("out_proj", new)
    else:
        layer.self_attn._modules["out_proj"] = new
    x = torch.randn(2, 5, E, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, unfused(layer, x), **TOL)
