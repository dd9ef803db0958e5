"""The inference weights path writes the softmax over its scores buffer
(:func:`multihead.weights._softmax_in_place`). That is only right if aten's softmax kernel may
alias its input and output; these tests check it bitwise against the out-of-place softmax on
the kernels this CPU runs (vectorised widths, row tails, -inf and large entries)."""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead.weights import _softmax_in_place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 15, 16, 17, 31, 64, 100, 255, 513, 2049])
def test_in_place_softmax_is_bitwise_the_out_of_place_one(dtype, width):
    generator = torch.Generator().manual_seed(width)
    scores = (torch.randn(3, 2, 5, width, generator=generator) * 30).to(dtype)
    scores[0, 0, 0, ::2] = float("-inf")  # partly hidden rows
    scores[1, 1, 2, 0] = torch.finfo(dtype).max / 2  # one dominant logit
    expected = torch.softmax(scores, dim=-1)
    got = _softmax_in_place(scores.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # bitwise


def test_inference_weights_equal_the_autograd_path():
    """The in-place blocks (no_grad) against the same call with autograd (no scratch)."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 130, 32)
    mask = torch.rand(2, 130) < 0.2
    mask[:, 0] = False
    with torch.no_grad():
        out, weights = layer(x, x, x, key_padding_mask=mask, average_attn_weights=False)
    ref, ref_weights = layer(x, x, x, key_padding_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
