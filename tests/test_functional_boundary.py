"""multihead.attention / attention_weights check their arguments at the boundary.

A bool mask is refused (torch gives it opposite meanings: SDPA True = attend, the layer True =
masked), and so are ranks other than 4, head counts that do not divide, mismatched sizes and
dtypes, and masks that do not broadcast: each with an error naming the argument, on every
path (so no path accepts what another refuses).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead
import multihead.functional

F64 = torch.float64


def qkv(n=2, h=4, hkv=2, length=3, s=5, d=4, dv=None, dtype=F64):
    return (
        torch.randn(n, h, length, d, dtype=dtype),
        torch.randn(n, hkv, s, d, dtype=dtype),
        torch.randn(n, hkv, s, dv or d, dtype=dtype),
    )


PATH_SETTINGS = [  # (need_weights, SMALL_SCORES): the explicit, sdpa and blockwise paths
    (True, 16 * 1024),
    (False, 16 * 1024),
    (True, 0),
]


def bad_calls():
    q, k, v = qkv()
    return [
        ("bool mask", (q, k, v, torch.zeros(3, 5, dtype=torch.bool)), TypeError, r"`mask`.*bool"),
        ("int mask", (q, k, v, torch.zeros(3, 5, dtype=torch.int64)), TypeError, r"`mask`"),
        ("3-D q", (q[0], k, v, None), ValueError, r"`q`.*4-D"),
        ("3-D k", (q, k[0], v, None), ValueError, r"`k`.*4-D"),
        ("5-D v", (q, k, v[None], None), ValueError, r"`v`.*4-D"),
        ("heads", (*qkv(h=4, hkv=3), None), ValueError, r"`k`.*dividing q's 4"),
        ("head dim", (q, torch.randn(2, 2, 5, 3, dtype=F64), v, None), ValueError, r"`k`"),
        ("batch", (q, k[:1], v[:1], None), ValueError, r"`k`"),
        ("v length", (q, k, v[:, :, :4], None), ValueError, r"`v`"),
        ("dtype", (q.float(), k, v, None), TypeError, r"`k`.*dtype"),
        ("integer q", (q.long(), k.long(), v.long(), None), TypeError, r"`q`.*floating"),
        ("mask shape", (q, k, v, torch.zeros(3, 4, dtype=F64)), ValueError, r"`mask`.*broad"),
        ("mask rank", (q, k, v, torch.zeros(1, 1, 1, 3, 5, dtype=F64)), ValueError, r"`mask`"),
        ("not a tensor", (q.tolist(), k, v, None), TypeError, r"`q`.*torch.Tensor"),
    ]


@pytest.mark.parametrize(("need_weights", "small"), PATH_SETTINGS)
@pytest.mark.parametrize(
    ("label", "args", "error", "match"), bad_calls(), ids=[c[0] for c in bad_calls()]
)
def test_attention_refuses_bad_arguments_on_every_path(
    monkeypatch, need_weights, small, label, args, error, match
):
    monkeypatch.setattr(multihead.functional, "SMALL_SCORES", small)
    with pytest.raises(error, match=rf"Invalid argument {match}"):
        multihead.attention(*args, need_weights=need_weights)
    if label not in ("3-D v", "5-D v", "v length"):  # attention_weights takes no v
        q, k, _, mask = args
        with pytest.raises(error, match=rf"Invalid argument {match}"):
            multihead.attention_weights(q, k, mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dropout_p=1.5), r"`dropout_p`"),
        (dict(dropout_p=-0.1), r"`dropout_p`"),
        (dict(softcap=float("inf")), r"`softcap`"),
        (dict(softcap=0.0), r"`softcap`"),
    ],
)
def test_attention_refuses_out_of_range_options(kwargs, match):
    with pytest.raises(ValueError, match=rf"Invalid argument {match}"):
        multihead.attention(*qkv(), **kwargs)


@settings(max_examples=30)
@given(
    n=st.integers(1, 2),
    groups=st.integers(1, 3),
    hkv=st.integers(1, 2),
    length=st.integers(1, 4),
    s=st.integers(1, 5),
    need_weights=st.booleans(),
    masked=st.floats(0.0, 1.0),
)
def test_attention_weights_handles_fully_masked_rows(
    n, groups, hkv, length, s, need_weights, masked
):
    """The public weights function finds empty rows itself: zero weights, never NaN, and
    the same weights attention() returns."""
    q, k, v = qkv(n=n, h=groups * hkv, hkv=hkv, length=length, s=s)
    mask = torch.zeros(n, 1, length, s, dtype=F64).masked_fill(
        torch.rand(n, 1, length, s) < masked, float("-inf")
    )
    weights = multihead.attention_weights(q, k, mask)
    empty = (mask == float("-inf")).all(-1, keepdim=True).expand_as(weights)
    assert torch.isfinite(weights).all() and (weights[empty] == 0).all()
    _, per_head = multihead.attention(q, k, v, mask, need_weights=True, average_weights=False)
    torch.testing.assert_close(weights, per_head, atol=1e-12, rtol=1e-12)
