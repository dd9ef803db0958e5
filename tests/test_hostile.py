"""Faults found by attacking the layer as a hostile user would, one test per kind."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import multihead
import multihead.functional

F64 = torch.float64


def twin_layers(dtype, embed_dim=8, num_heads=2, **kwargs):
    """The same random parameters in ``dtype`` and in float64."""
    torch.manual_seed(0)
    low = multihead.MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=F64, **kwargs)
    with torch.no_grad():
        for p in low.parameters():
            p.normal_(0, 0.5)
    return copy.deepcopy(low).to(dtype), low


@settings(max_examples=60)
@given(
    constraint=st.sampled_from(["is_causal", "window", "segments", "zero_attn", "bias_kv", "kpm"]),
    big=st.sampled_from([-1e300, -1e200, -1e39]),
    layer_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    need_weights=st.booleans(),
)
def test_a_wide_float_mask_keeps_its_meaning_with_every_other_constraint(
    constraint, big, layer_dtype, seed, need_weights
):
    """A float64 attn_mask (and key padding mask) of 0 and a huge finite value, cast to a
    narrower layer dtype, is narrowed after every other constraint is added (causal, window,
    segments, extra key slots, key padding). Oracle: the float64 layer given the same mask with
    -1e4 in place of the huge value, which is the same function (a row's constant shift leaves
    the softmax unchanged, and e**-1e4 is 0): no row empties, nor attends to a key the
    constraints hide because the row's largest value sat on a hidden key."""
    kwargs = dict(
        window=dict(window=2),
        zero_attn=dict(add_zero_attn=True),
        bias_kv=dict(add_bias_kv=True),
    ).get(constraint, {})
    low, exact = twin_layers(layer_dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    length = 4
    x = torch.randn(2, length, 8, generator=gen, dtype=F64)

    def masks(shape, value):
        hidden = torch.rand(shape, generator=gen) < 0.5
        return (
            torch.where(hidden, torch.tensor(value, dtype=F64), torch.tensor(0.0, dtype=F64))
            for value in (big, -1e4)
        )

    calls = [dict(need_weights=need_weights), dict(need_weights=need_weights)]
    for call, mask in zip(calls, masks((length, length), big), strict=True):
        call["attn_mask"] = mask
    if constraint in ("is_causal", "window"):
        for call in calls:
            call["is_causal"] = True
    if constraint == "segments":
        for call in calls:
            call["segment_ids"] = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    if constraint == "kpm":
        for call, mask in zip(calls, masks((2, length), big), strict=True):
            call["key_padding_mask"] = mask
    low_x = x.to(layer_dtype)
    out, w = low(low_x, low_x, low_x, **calls[0])
    ref, ref_w = exact(x, x, x, **calls[1])
    # bfloat16 keeps 8 bits: its own rounding reaches about 0.1 here; the faults this test
    # catches (an emptied row gives the bias, a hidden key gets weight) are errors of order 1.
    tol = 1e-5 if layer_dtype == torch.float32 else 0.2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    if need_weights:
        torch.testing.assert_close(w.double(), ref_w, atol=tol, rtol=tol)


@pytest.mark.parametrize("convert", ["swap", "from_torch", "to_torch"])
def test_conversions_keep_each_parameters_requires_grad(convert):
    """load_state_dict(assign=True) would give the moved parameters the placeholder's
    requires_grad (True), in the source model too: a frozen backbone would become trainable."""
    torch.manual_seed(0)
    if convert == "to_torch":
        layer = multihead.MultiheadAttention(8, 2, add_bias_kv=True)
    else:
        layer = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    layer.requires_grad_(False)
    layer.in_proj_bias.requires_grad_(True)  # mixed, so a blanket setting would be caught
    before = {n: p.requires_grad for n, p in layer.named_parameters()}
    if convert == "swap":
        model = nn.Sequential(layer)
        multihead.swap(model)
        converted = model[0]
    else:
        converted = getattr(multihead, convert)(layer)
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == before
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == before


def test_swap_refuses_a_reparametrised_layer_by_name_and_changes_nothing():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2))
    torch.nn.utils.prune.l1_unstructured(model[1].out_proj, "weight", amount=0.5)
    modules = list(model.modules())
    with pytest.raises(ValueError, match=r"Invalid argument `layer`.*state_dict"):
        multihead.swap(model)
    assert list(model.modules()) == modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rope_base_beyond_float32_is_exact(dtype):
    """rope_base 1e39 overflowed float32 (every frequency but the first became 0): the
    frequencies now come from float64, so the low-precision layer is as close to the float64
    one as with an ordinary base (its own rounding, nothing more)."""
    x = torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(0), dtype=F64)

    def error(base):
        low, exact = twin_layers(dtype, 128, 2, rope=True, rope_base=base)  # D = 64
        out, _ = low(x.to(dtype), x.to(dtype), x.to(dtype))
        return float((out.double() - exact(x, x, x)[0]).abs().max())

    assert error(1e39) <= 2 * error(1e4)


@pytest.mark.parametrize("small", [16 * 1024, 0])
@pytest.mark.parametrize("grad", [False, True])
def test_add_bias_kv_under_autocast_on_every_path(small, grad, monkeypatch):
    """The float32 bias_k / bias_v join bfloat16 keys under autocast: cast to the keys' dtype
    (the blockwise path's matmul(out=...) refused the mix)."""
    monkeypatch.setattr(multihead.functional, "SMALL_SCORES", small)
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True)
    layer.train(grad)
    x = torch.randn(12, 2, 16)
    with torch.set_grad_enabled(grad):
        ref, ref_w = layer(x, x, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, w = layer(x, x, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(w.float(), ref_w, atol=5e-2, rtol=5e-2)


def test_vmap_over_bool_masks_and_segment_ids():
    """Bool masks become additive out of place, so a vmapped mask works, as with torch's."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, dtype=F64)
    x = torch.randn(3, 1, 5, 8, dtype=F64)
    padding = torch.rand(3, 1, 5) < 0.3
    padding[..., 0] = False
    segments = torch.tensor([[[0, 0, 1, 1, 1]], [[0, 1, 1, 2, 2]], [[0, 0, 0, 0, 0]]])

    def f(a, p, s):
        return layer(a, a, a, key_padding_mask=p, segment_ids=s)[0]

    out = torch.func.vmap(f)(x, padding, segments)
    for i in range(3):
        torch.testing.assert_close(out[i], f(x[i], padding[i], segments[i]), atol=1e-12, rtol=0)


def test_forward_on_the_meta_device_gives_shapes():
    layer = multihead.MultiheadAttention(8, 2, device="meta")
    x = torch.empty(3, 2, 8, device="meta")
    out, w = layer(x, x, x)
    assert out.shape == (3, 2, 8) and w.shape == (2, 3, 3) and out.device.type == "meta"


@pytest.mark.parametrize("small", [16 * 1024, 0])
@pytest.mark.parametrize("need_weights", [False, True])
def test_functional_masks_of_every_broadcastable_rank_on_every_path(
    small, need_weights, monkeypatch
):
    monkeypatch.setattr(multihead.functional, "SMALL_SCORES", small)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, generator=gen, dtype=F64) for _ in range(3))
    full = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)
    for mask in (full[0, 0, 0], full[0, 0], full[0], full):  # (S,), (L, S), (H, L, S), 4-D
        out, _w = multihead.attention(q, k, v, mask, need_weights=need_weights)
        ref, _ref_w = multihead.attention(
            q, k, v, mask.expand(2, 2, 3, 3).clone(), need_weights=True
        )
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(TypeError, match=r"Invalid argument `mask`.*dtype torch.float64"):
        multihead.attention(q, k, v, full.float(), need_weights=need_weights)


def test_copied_model_with_caches():
    """Documented: a deep copy of a model holding its caches gets unowned copies of them,
    which the first layer to use each claims; the originals stay with the original layers."""
    layer = multihead.MultiheadAttention(8, 2, batch_first=True).eval()
    holder = nn.Module()
    holder.layer, holder.cache = layer, layer.new_cache(1, 4)
    twin = copy.deepcopy(holder)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        twin.layer(x, x, x, cache=twin.cache)
        with pytest.raises(ValueError, match=r"`cache`.*another layer"):
            twin.layer(x, x, x, cache=holder.cache)


LAYOUTS = {
    "last dim transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    "heads last": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    "strided last dim": lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twice_differentiable_sdpa_on_any_layout(layout, dtype):
    """q, k, v whose last dim is not contiguous: SDPA itself does not take its flash kernel
    there, and neither may our direct call of it (it read the wrong memory: errors of 1e34)."""
    gen = torch.Generator().manual_seed(0)
    make = LAYOUTS[layout]
    q, k, v = (make(torch.randn(2, 3, 5, 4, generator=gen, dtype=dtype)) for _ in range(3))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [make(t.detach().clone()).requires_grad_() for t in (q, k, v)]
    out, _ = multihead.attention(*ours)
    expected = torch.nn.functional.scaled_dot_product_attention(*ref)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, expected, **tol)
    for a, b in zip(
        torch.autograd.grad(out, ours, grad), torch.autograd.grad(expected, ref, grad), strict=True
    ):
        torch.testing.assert_close(a, b, **tol)


def test_twice_differentiable_sdpa_respects_the_chosen_backend():
    """Under sdpa_kernel(MATH) SDPA runs its math kernel; so does ours, bit for bit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = multihead.functional.sdpa(*ours, None, dropout_p=0.0, is_causal=False)
        expected = torch.nn.functional.scaled_dot_product_attention(*ref)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("need_weights", [False, True])
def test_activation_checkpointing(need_weights):
    """torch.utils.checkpoint (non-reentrant) unpacks each saved tensor once; the SDPA path's
    backward read them twice and failed."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 40, 16, requires_grad=True)

    def f(x):
        return layer(x, x, x, need_weights=need_weights)[0]

    (grad,) = torch.autograd.grad(checkpoint(f, x, use_reentrant=False).sum(), x)
    (expected,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)


def test_a_refused_conversion_leaves_requires_grad_alone():
    layer = nn.MultiheadAttention(8, 2)
    layer.out_proj.requires_grad_(False)
    layer.register_buffer("extra", torch.zeros(1))  # makes the strict load refuse
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"`layer`"):
        multihead.swap(model)
    assert not layer.out_proj.weight.requires_grad and not layer.out_proj.bias.requires_grad
    assert layer.in_proj_weight.requires_grad


def test_the_declining_hook_survives_a_pickle_and_a_users_hooks(tmp_path):
    """Saved by one fresh process and loaded by another, hook handles are numbered alike: our
    hook is registered afresh on load, so a user's hook (added, then removed) never takes its
    key and removes it with itself."""
    import subprocess
    import sys

    path = str(tmp_path / "layer.pt")
    save = f"import torch, multihead; torch.save(multihead.MultiheadAttention(8, 2), {path!r})"
    load = f"""
import torch, multihead
from multihead.layer import _declines_fused_encoder_kernel as hook
layer = torch.load({path!r}, weights_only=False)
guard = layer._fused_kernel_guard
handle = guard.register_forward_pre_hook(lambda m, a: None)
handle.remove()
assert list(guard._forward_pre_hooks.values()) == [hook], guard._forward_pre_hooks
assert not layer._forward_pre_hooks
"""
    for script in (save, load):
        subprocess.run([sys.executable, "-c", script], check=True)


def test_nested_inputs_must_hold_2d_sequences():
    layer = multihead.MultiheadAttention(8, 2, batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 4, 8)])
    with pytest.raises(ValueError, match=r"`query`.*\(N, \*, E\)"):
        layer(x, x, x)


@pytest.mark.parametrize("value", [-3e38, -1e39, -1e300])
def test_nearly_equal_wide_masks_give_nearly_equal_results(value):
    """A float64 row of one large constant on a float32 layer adds nothing, whether or not the
    constant fits float32 (it was uniform for -3e38 and softmax(logits) for -1e39)."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 5, 8)
    _, weights = layer(x, x, x, attn_mask=torch.full((5, 5), value, dtype=F64))
    _, plain = layer(x, x, x)
    torch.testing.assert_close(weights, plain, atol=1e-6, rtol=1e-6)
