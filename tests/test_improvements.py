"""The deliberate differences from torch (README, "Differences from torch")."""

from __future__ import annotations

import pytest
import torch

import multihead

E, H = 8, 2


def pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    ours = multihead.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    theirs = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kpm", [False, True])
def test_is_causal_without_mask_applies_the_causal_mask(training, need_weights, kpm):
    ours, theirs = pair(batch_first=True)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5]) if kpm else None
    with torch.no_grad():
        out, w = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights, is_causal=True)
        explicit, _ = ours(
            x, x, x, key_padding_mask=padding, need_weights=need_weights, attn_mask=causal_bool(5)
        )
    ref, ref_w = theirs(
        x, x, x, key_padding_mask=padding, need_weights=need_weights, attn_mask=causal_bool(5)
    )
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, explicit, atol=1e-12, rtol=0)
    if need_weights:
        torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=0)
        assert (w[:, 0, 1:] == 0).all(), "the first query sees only the first key"


def test_is_causal_with_a_mask_applies_both():
    ours, theirs = pair()
    x = torch.randn(6, 3, E, dtype=torch.float64)  # (L, N, E)
    band = torch.ones(6, 6, dtype=torch.bool).tril(-3)  # masks keys more than 2 behind
    out, w = ours(x, x, x, attn_mask=band, is_causal=True)
    ref, ref_w = theirs(x, x, x, attn_mask=band | causal_bool(6))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=0)


def test_is_causal_with_fewer_queries_than_keys_is_top_left_aligned():
    ours, _ = pair(batch_first=True)
    q = torch.randn(1, 2, E, dtype=torch.float64)
    kv = torch.randn(1, 4, E, dtype=torch.float64)
    _, w = ours(q, kv, kv, is_causal=True, average_attn_weights=False)
    visible = w[0, 0] > 0
    assert visible.tolist() == [[True, False, False, False], [True, True, False, False]]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_attention_and_zero_weights(training, need_weights, mask_kind):
    ours, theirs = pair(batch_first=True)
    with torch.no_grad():
        ours.out_proj.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    ours.train(training)
    x = torch.randn(2, 4, E, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[True] * 4, [False, False, True, True]])  # batch 0: every key masked
    if mask_kind == "float":
        padding = torch.zeros(2, 4, dtype=torch.float64).masked_fill(padding, float("-inf"))
    out, w = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    # No keys: the attention is zero, so the output is out_proj's bias.
    torch.testing.assert_close(out[0], ours.out_proj.bias.expand(4, E), atol=0, rtol=0)
    if need_weights:
        assert (w[0] == 0).all()
        assert torch.isfinite(w).all()
    # The other batch element is unaffected and matches torch.
    ref, _ = theirs(x[1:], x[1:], x[1:], key_padding_mask=padding[1:], need_weights=need_weights)
    torch.testing.assert_close(out[1:], ref, atol=1e-12, rtol=0)
    (out.sum() + (w.sum() if need_weights else 0)).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_rows_masked_by_attn_mask_only_in_some_heads():
    ours, _ = pair()
    x = torch.randn(3, 1, E, dtype=torch.float64)  # (L, N, E)
    mask = torch.zeros(H, 3, 3, dtype=torch.bool)
    mask[1, 2, :] = True  # head 1, query 2 sees nothing
    _, w = ours(x, x, x, attn_mask=mask, average_attn_weights=False)
    assert (w[0, 1, 2] == 0).all()
    torch.testing.assert_close(w[0, 0, 2].sum(), torch.tensor(1.0, dtype=torch.float64))
    _, w_avg = ours(x, x, x, attn_mask=mask)
    torch.testing.assert_close(w_avg[0, 2].sum(), torch.tensor(0.5, dtype=torch.float64))


def test_extra_key_slots_stay_attendable_under_causal_in_every_path():
    """torch's need_weights=False causal path hides add_zero_attn's slot from early queries;
    ours keeps it attendable everywhere, so the two paths agree."""
    ours, _ = pair(add_zero_attn=True, add_bias_kv=True)
    x = torch.randn(4, 2, E, dtype=torch.float64)
    with_weights, w = ours(x, x, x, is_causal=True)
    without, _ = ours(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(with_weights, without, atol=1e-12, rtol=0)
    assert (w[:, 0, -2:] > 0).all(), "bias_kv and zero slots are visible to query 0"
