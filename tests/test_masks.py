"""masks.py: one canonical additive form, polarity, causal alignment, empty rows."""

from __future__ import annotations

import torch

from multihead.masks import canonical_mask, causal_mask, split_empty_rows, to_additive

INF = float("-inf")


def test_bool_true_means_masked():
    m = to_additive(torch.tensor([[False, True]]), torch.float32)
    assert m.tolist() == [[0.0, INF]]


def test_float_masks_are_added_as_given_and_cast():
    m = torch.tensor([0.5, -2.0], dtype=torch.float64)
    out = to_additive(m, torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == [0.5, -2.0]


def test_to_additive_does_not_modify_the_callers_mask():
    m = torch.tensor([True, False])
    to_additive(m, torch.float32)
    assert m.tolist() == [True, False]


def test_causal_mask_is_top_left_aligned():
    m = causal_mask(2, 3, torch.float32, torch.device("cpu"))
    assert m.tolist() == [[0.0, INF, INF], [0.0, 0.0, INF]]


def common(**kw):
    base = dict(
        key_padding_mask=None,
        attn_mask=None,
        is_causal=False,
        batch_size=2,
        num_heads=3,
        query_len=2,
        key_len=2,
        extra_keys=0,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    return canonical_mask(**{**base, **kw})


def test_no_mask():
    assert common() == (None, False)


def test_causal_alone_is_left_to_the_kernel():
    assert common(is_causal=True) == (None, True)


def test_causal_with_extra_keys_is_folded_into_the_mask_and_extra_slots_stay_open():
    mask, causal = common(is_causal=True, extra_keys=2)
    assert not causal
    assert mask.tolist() == [[0.0, INF, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_padding_and_3d_attn_mask_merge_to_n_h_l_s():
    kpm = torch.tensor([[False, True], [False, False]])
    attn = torch.zeros(6, 2, 2, dtype=torch.bool)
    attn[5, 1, 0] = True  # batch 1, head 2, query 1, key 0
    mask, causal = common(key_padding_mask=kpm, attn_mask=attn)
    assert not causal and mask.shape == (2, 3, 2, 2)
    assert (mask[0, :, :, 1] == INF).all() and (mask[0, :, :, 0] == 0).all()
    assert mask[1, 2, 1, 0] == INF and (mask[1].isinf().sum() == 1)


def test_padding_alone_stays_broadcast():
    mask, _ = common(key_padding_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert mask.shape == (2, 1, 1, 2)


def test_split_empty_rows():
    mask = torch.tensor([[0.0, INF], [INF, INF]])
    unmasked, empty = split_empty_rows(mask)
    assert empty.tolist() == [[False], [True]]
    assert unmasked.tolist() == [[0.0, INF], [0.0, 0.0]]
    assert split_empty_rows(None) == (None, None)


def test_causal_pattern_detection():
    from multihead.masks import is_causal_pattern

    for q_len, s_len in [(1, 1), (3, 3), (2, 5), (5, 2)]:
        bool_mask = torch.ones(q_len, s_len, dtype=torch.bool).triu(1)
        float_mask = causal_mask(q_len, s_len, torch.float32, torch.device("cpu"))
        assert is_causal_pattern(bool_mask) and is_causal_pattern(float_mask)
        assert not is_causal_pattern(bool_mask.expand(2, q_len, s_len))
    near = causal_mask(4, 4, torch.float32, torch.device("cpu"))
    near[2, 0] = -1.0
    assert not is_causal_pattern(near)
    banded = torch.ones(4, 4, dtype=torch.bool).triu(1)
    banded[3, 0] = True
    assert not is_causal_pattern(banded)
    assert not is_causal_pattern(torch.zeros(3, 3, dtype=torch.bool))
    assert not is_causal_pattern(torch.ones(4, 4, dtype=torch.bool).triu(2))  # wrong first row
    inner = torch.ones(5, 5, dtype=torch.bool).triu(1)
    inner[3, 2] = True  # only the interior differs
    assert not is_causal_pattern(inner)
    inner_float = causal_mask(5, 5, torch.float32, torch.device("cpu"))
    inner_float[4, 2] = 0.5
    assert not is_causal_pattern(inner_float)


def test_a_causal_attn_mask_becomes_the_kernel_flag():
    pattern = torch.ones(2, 2, dtype=torch.bool).triu(1)
    assert common(attn_mask=pattern) == (None, True)
    assert common(attn_mask=pattern, is_causal=True) == (None, True)
    mask, causal = common(attn_mask=pattern, key_padding_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert not causal and mask.shape == (2, 1, 2, 2)
