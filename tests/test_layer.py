"""Construction, parameters, initialisation and checkpoints are torch's."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import multihead
from multihead.layer import _declines_fused_encoder_kernel

CONFIGS = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=16, num_heads=4, bias=False),
    dict(embed_dim=12, num_heads=3, add_bias_kv=True, add_zero_attn=True),
    dict(embed_dim=8, num_heads=2, kdim=5, vdim=7),
    dict(embed_dim=8, num_heads=2, kdim=8, vdim=3, bias=False, add_bias_kv=True),
    dict(embed_dim=6, num_heads=1, dropout=0.25, batch_first=True),
    dict(embed_dim=64, num_heads=8, dtype=torch.float64),
]
ATTRS = [
    "embed_dim",
    "kdim",
    "vdim",
    "num_heads",
    "head_dim",
    "_qkv_same_embed_dim",
    "dropout",
    "batch_first",
    "add_zero_attn",
    "training",
]


def build(cls, cfg, seed=0):
    torch.manual_seed(seed)
    return cls(**cfg)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_attributes_parameters_and_registration_order(cfg):
    ours, theirs = build(multihead.MultiheadAttention, cfg), build(torch.nn.MultiheadAttention, cfg)
    for name in ATTRS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()
    ]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]:
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None), name
    assert (ours.bias_k is None) == (theirs.bias_k is None)
    assert type(ours.out_proj) is type(theirs.out_proj)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_initialisation_is_bitwise_torchs(cfg, seed):
    ours, theirs = (
        build(multihead.MultiheadAttention, cfg, seed),
        build(torch.nn.MultiheadAttention, cfg, seed),
    )
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # And the generator is left in the same state: the next draw agrees.
    build(multihead.MultiheadAttention, cfg, seed)
    after_ours = torch.rand(3)
    build(torch.nn.MultiheadAttention, cfg, seed)
    assert torch.equal(after_ours, torch.rand(3))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reset_parameters_redraws_in_torchs_order(cfg):
    ours, theirs = build(multihead.MultiheadAttention, cfg), build(torch.nn.MultiheadAttention, cfg)
    torch.manual_seed(99)
    ours._reset_parameters()
    torch.manual_seed(99)
    theirs._reset_parameters()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if cfg.get("bias", True):
        assert (ours.in_proj_bias == 0).all() and (ours.out_proj.bias == 0).all()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_loads_both_ways_strictly(cfg):
    ours, theirs = (
        build(multihead.MultiheadAttention, cfg, 1),
        build(torch.nn.MultiheadAttention, cfg, 2),
    )
    assert not torch.equal(ours.out_proj.weight, theirs.out_proj.weight)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh_torch = build(torch.nn.MultiheadAttention, cfg, 3)
    fresh_torch.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(fresh_torch.out_proj.weight, theirs.out_proj.weight)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_checkpoints_survive_torch_save_and_weights_only_load(cfg):
    ours, theirs = (
        build(multihead.MultiheadAttention, cfg, 1),
        build(torch.nn.MultiheadAttention, cfg, 2),
    )
    for src, dst_cls in [
        (theirs, multihead.MultiheadAttention),
        (ours, torch.nn.MultiheadAttention),
    ]:
        buffer = io.BytesIO()
        torch.save(src.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        dst = build(dst_cls, cfg, 5)
        dst.load_state_dict(state, strict=True)
        for (name, a), b in zip(dst.state_dict().items(), src.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_a_torch_checkpoint_gives_torchs_numbers():
    cfg = dict(embed_dim=16, num_heads=4, batch_first=True, dtype=torch.float64)
    theirs = build(torch.nn.MultiheadAttention, cfg, 3)
    ours = build(multihead.MultiheadAttention, cfg, 4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-12, rtol=0)


def test_whole_module_pickles_and_old_pickles_get_qkv_same_embed_dim():
    layer = build(multihead.MultiheadAttention, dict(embed_dim=8, num_heads=2))
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone.in_proj_weight, layer.in_proj_weight)
    # As pickled by torch 1.1 (no _qkv_same_embed_dim), by torch today (the attribute stored,
    # none of our options), and by us before it became derived (stored, possibly stale).
    modern = ("num_kv_heads", "rope", "rope_base", "window", "qk_norm", "softcap")
    for stored in (None, True, False):
        state = {k: v for k, v in layer.__dict__.items() if k not in modern}
        if stored is not None:
            state["_qkv_same_embed_dim"] = stored
        old = multihead.MultiheadAttention.__new__(multihead.MultiheadAttention)
        old.__setstate__(state)
        assert old._qkv_same_embed_dim is True and old.is_torch_compatible
        # The hook that declines torch's fused encoder kernel sits on a guard child.
        assert guard_hooks(old) == [_declines_fused_encoder_kernel]
        assert not old._forward_pre_hooks and not old.out_proj._forward_pre_hooks
        assert old.in_proj_weight is not None
        assert old.num_kv_heads == 2 and old.rope is False and old.softcap is None


def guard_hooks(layer) -> list:
    return list(layer._fused_kernel_guard._forward_pre_hooks.values())


def test_a_pickle_with_the_hook_on_the_layer_moves_it_to_a_guard():
    """Layers pickled before the guard carry the hook on the layer itself (where it sends
    every call through nn.Module's hook path) and no guard: loading moves it."""
    layer = build(multihead.MultiheadAttention, dict(embed_dim=8, num_heads=2))
    del layer._fused_kernel_guard
    layer.register_forward_pre_hook(_declines_fused_encoder_kernel)
    clone = pickle.loads(pickle.dumps(layer))
    assert not clone._forward_pre_hooks
    assert guard_hooks(clone) == [_declines_fused_encoder_kernel]
    assert clone.state_dict().keys() == layer.state_dict().keys()


def test_the_guard_adds_no_state_dict_key_and_survives_out_proj_replacement():
    layer = multihead.MultiheadAttention(8, 2)
    theirs = torch.nn.MultiheadAttention(8, 2)
    assert list(layer.state_dict()) == list(theirs.state_dict())
    layer._modules["out_proj"] = torch.nn.Linear(8, 8)  # as module replacers do
    layer.add_module("out_proj", torch.jit.script(torch.nn.Linear(8, 8)))
    assert guard_hooks(layer) == [_declines_fused_encoder_kernel]
    x = torch.randn(3, 2, 8)
    out, _ = layer(x, x, x)  # a TorchScript out_proj: the full path reads its weight
    assert out.shape == (3, 2, 8)


def test_device_and_dtype_arguments():
    layer = multihead.MultiheadAttention(8, 2, kdim=3, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert {p.device.type for p in layer.parameters()} == {"cpu"}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_output_and_weight_shapes(batch_first, average):
    layer = multihead.MultiheadAttention(
        12, 3, batch_first=batch_first, add_bias_kv=True, add_zero_attn=True
    )
    n, q_len, s_len = 2, 3, 5
    q = torch.randn((n, q_len, 12) if batch_first else (q_len, n, 12))
    kv = torch.randn((n, s_len, 12) if batch_first else (s_len, n, 12))
    out, w = layer(q, kv, kv, average_attn_weights=average)
    assert out.shape == q.shape
    assert w.shape == ((n, q_len, s_len + 2) if average else (n, 3, q_len, s_len + 2))
    out, w = layer(
        q[0] if batch_first else q[:, 0],
        kv[0] if batch_first else kv[:, 0],
        kv[0] if batch_first else kv[:, 0],
        average_attn_weights=average,
    )
    assert out.shape == (q_len, 12)
    assert w.shape == ((q_len, s_len + 2) if average else (3, q_len, s_len + 2))
    _, none = layer(q, kv, kv, need_weights=False)
    assert none is None


def test_never_calls_torchs_attention(monkeypatch):
    """torch's class is the oracle, never the engine."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's multi-head attention was called")

    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", forbidden)
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", forbidden)
    monkeypatch.setattr(torch, "_native_multi_head_attention", forbidden)
    layer = multihead.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True, kdim=3)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 4, 3)
    v = torch.randn(2, 4, 8)
    layer(q, k, v)[0].sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(q, k, v, need_weights=False)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_low_precision_dtypes_match_torch(dtype, tol, need_weights):
    cfg = dict(embed_dim=32, num_heads=4, batch_first=True)
    ours = build(multihead.MultiheadAttention, cfg).to(dtype)
    theirs = build(torch.nn.MultiheadAttention, cfg).to(dtype)
    x = torch.randn(2, 7, 32).to(dtype)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    out, w = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    ref, ref_w = theirs(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if need_weights:
        assert w.dtype == dtype
        torch.testing.assert_close(w, ref_w, atol=tol, rtol=tol)
