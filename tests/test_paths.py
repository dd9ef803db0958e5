"""Every kernel path equals the explicit reference path: outputs, weights and gradients.

The reference is softmax(q k^T / sqrt(D) + mask) v with fully masked rows set to zero, built
here from torch primitives independently of the paths under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead
import multihead.functional
import multihead.weights
from multihead.functional import SMALL_SCORES, attention, select_path
from multihead.weights import averaged_attention_weights, blockwise_attention_with_weights

INF = float("-inf")
TOL = dict(atol=1e-12, rtol=1e-10)


def reference(q, k, v, mask, is_causal):
    """Per-head weights (N, H, L, S) and output (N, H, L, D), straight from the formula."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), INF)
    empty = (scores == INF).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return weights @ v, weights


@st.composite
def problems(draw):
    n, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    q_len, s_len, d = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    kind = draw(st.sampled_from([None, "full", "heads-broadcast", "padding", "2d"]))
    mask = None
    if kind is not None:
        shape = {
            "full": (n, h, q_len, s_len),
            "heads-broadcast": (n, 1, q_len, s_len),
            "padding": (n, 1, 1, s_len),
            "2d": (q_len, s_len),
        }[kind]
        masked = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        mask = t(*shape).masked_fill(masked, INF)
    is_causal = draw(st.booleans())
    block = draw(st.integers(1, 4))  # query rows per block: exercises every block boundary
    return t(n, h, q_len, d), t(n, h, s_len, d), t(n, h, s_len, d), mask, is_causal, block


def set_block_rows(monkeypatch, q, k, rows):
    n, h, s = q.shape[0], q.shape[1], k.shape[-2]
    monkeypatch.setattr(multihead.weights, "BLOCK_ELEMENTS", rows * n * h * s)


@settings(max_examples=150)
@given(problem=problems())
def test_sdpa_path(problem):
    q, k, v, mask, is_causal, _ = problem
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, weights = attention(*leaves, mask, is_causal=is_causal, need_weights=False)
    assert weights is None
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, _ = reference(*ref_leaves, mask, is_causal)
    torch.testing.assert_close(out, ref_out, **TOL)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@settings(max_examples=150)
@given(problem=problems(), average=st.booleans())
def test_blockwise_inference_path(problem, average):
    q, k, v, mask, is_causal, block = problem
    with pytest.MonkeyPatch.context() as mp:
        set_block_rows(mp, q, k, block)
        mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        with torch.no_grad():
            out, weights = attention(
                q, k, v, mask, is_causal=is_causal, need_weights=True, average_weights=average
            )
    ref_out, ref_w = reference(q, k, v, mask, is_causal)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(weights, ref_w.mean(1) if average else ref_w, **TOL)


@settings(max_examples=150)
@given(problem=problems(), mask_grad=st.booleans())
def test_sdpa_plus_recomputed_averaged_weights_path(problem, mask_grad):
    q, k, v, mask, is_causal, block = problem
    mask_grad = mask_grad and mask is not None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if mask_grad:
        leaves.append(mask.clone().requires_grad_())
        ref_leaves.append(mask.clone().requires_grad_())
    m, ref_m = (leaves[3], ref_leaves[3]) if mask_grad else (mask, mask)
    with pytest.MonkeyPatch.context() as mp:
        set_block_rows(mp, q, k, block)
        mp.setattr(multihead.functional, "SMALL_SCORES", 0)
        out, weights = attention(*leaves[:3], m, is_causal=is_causal, need_weights=True)
        ref_out, ref_w = reference(*ref_leaves[:3], ref_m, is_causal)
        ref_w = ref_w.mean(1)
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(weights, ref_w, **TOL)
        g_out, g_w = torch.randn_like(out), torch.randn_like(weights)
        grads = torch.autograd.grad((out, weights), leaves, (g_out, g_w), allow_unused=True)
        ref_grads = torch.autograd.grad(
            (ref_out, ref_w), ref_leaves, (g_out, g_w), allow_unused=True
        )
    for a, b in zip(grads, ref_grads, strict=True):
        # A -inf mask entry has no meaningful gradient; compare where the reference is finite.
        b = torch.zeros_like(a) if b is None else torch.nan_to_num(b, nan=0.0)
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, **TOL)


def test_output_backward_does_not_go_through_the_weights():
    """With the default call in training, the output's graph holds no (N, H, L, S) tensor."""
    q, k, v = (torch.randn(1, 2, 128, 8, requires_grad=True) for _ in range(3))
    assert 2 * 128 * 128 > SMALL_SCORES
    out, weights = attention(q, k, v, need_weights=True)
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        assert "Averaged" not in type(fn).__name__ and "Softmax" not in type(fn).__name__
        stack.extend(f for f, _ in fn.next_functions)
    assert type(weights.grad_fn).__name__ == "_AveragedWeightsBackward"
    saved = weights.grad_fn.saved_tensors
    assert max(t.numel() for t in saved if t is not None) == q.numel()  # q and k only


def test_averaged_weights_gradcheck_across_blocks(monkeypatch):
    monkeypatch.setattr(multihead.weights, "BLOCK_ELEMENTS", 2 * 2 * 5)  # 2-row blocks
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64)
    mask[0, 1, 2] = INF  # a fully masked row in one head
    mask = mask.requires_grad_()
    empty = (mask == INF).all(-1, keepdim=True)
    safe = mask.detach().masked_fill(empty, 0.0).requires_grad_()
    for causal in (False, True):

        def f(q, k, m, c=causal):
            return averaged_attention_weights(q, k, m, empty, is_causal=c)

        assert torch.autograd.gradcheck(f, (q, k, safe))
        assert torch.autograd.gradgradcheck(f, (q, k, safe))


def test_blockwise_uses_one_block_of_scratch(monkeypatch):
    monkeypatch.setattr(multihead.weights, "BLOCK_ELEMENTS", 3 * 4 * 7)
    q, k, v = torch.randn(1, 4, 10, 2), torch.randn(1, 4, 7, 2), torch.randn(1, 4, 7, 2)
    out, w = blockwise_attention_with_weights(q, k, v)
    ref_out, ref_w = reference(q, k, v, None, False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w.mean(1))


BIG = SMALL_SCORES + 1


@pytest.mark.parametrize(
    (
        "need_weights",
        "average",
        "dropout_p",
        "needs_grad",
        "scores",
        "softcap",
        "expected",
    ),
    [
        (False, True, 0.0, True, BIG, False, "sdpa"),
        (False, False, 0.1, False, 1, False, "sdpa"),
        (False, True, 0.0, False, BIG, False, "sdpa"),
        (True, True, 0.0, False, BIG, False, "blockwise"),
        (True, False, 0.0, False, BIG, False, "blockwise"),
        (True, False, 0.0, False, SMALL_SCORES, False, "explicit"),
        (True, True, 0.0, True, BIG, False, "sdpa+averaged_weights"),
        (True, True, 0.0, True, SMALL_SCORES, False, "explicit"),
        (True, False, 0.0, True, BIG, False, "explicit"),
        (True, True, 0.1, True, BIG, False, "explicit"),
        (True, True, 0.1, False, BIG, False, "explicit"),
        (False, True, 0.0, False, BIG, True, "blockwise"),  # softcap: no SDPA
        (True, True, 0.0, True, BIG, True, "explicit"),
        (False, True, 0.0, False, SMALL_SCORES, True, "explicit"),
    ],
)
def test_select_path(need_weights, average, dropout_p, needs_grad, scores, softcap, expected):
    got = select_path(
        need_weights=need_weights,
        average_weights=average,
        dropout_p=dropout_p,
        needs_grad=needs_grad,
        score_elements=scores,
        softcap=softcap,
    )
    assert got == expected


@pytest.mark.parametrize("block_rows", [1, 3, 7])
@pytest.mark.parametrize("training", [False, True])
def test_layer_matches_torch_across_block_boundaries(monkeypatch, block_rows, training):
    """The layer's default call in eval (blockwise) and training (SDPA + recomputed weights)
    equals torch's at a length that splits into uneven blocks."""
    torch.manual_seed(0)
    kwargs = dict(batch_first=True, dtype=torch.float64)
    ours = multihead.MultiheadAttention(16, 4, **kwargs).train(training)
    theirs = torch.nn.MultiheadAttention(16, 4, **kwargs).train(training)
    theirs.load_state_dict(ours.state_dict())
    monkeypatch.setattr(multihead.weights, "BLOCK_ELEMENTS", block_rows * 2 * 4 * 20)
    monkeypatch.setattr(multihead.functional, "SMALL_SCORES", 0)
    x = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 13:] = True
    with torch.set_grad_enabled(training):
        out, w = ours(x, x, x, key_padding_mask=padding)
        ref, ref_w = theirs(x, x, x, key_padding_mask=padding)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    if training:
        g = torch.autograd.grad((out.sum() + w.square().sum()), [x, *ours.parameters()])
        ref_g = torch.autograd.grad((ref.sum() + ref_w.square().sum()), [x, *theirs.parameters()])
        for a, b in zip(g, ref_g, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("need_weights", "training"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_low_precision_error_is_at_most_twice_torchs(dtype, need_weights, training):
    """flash-attn's rule: in a low-precision dtype, our error against the float64 result is at
    most twice torch's own error in that dtype (plus a hair for ties at tiny errors)."""
    torch.manual_seed(0)
    kwargs = dict(batch_first=True)
    exact = multihead.MultiheadAttention(64, 4, dtype=torch.float64, **kwargs)
    ours = multihead.MultiheadAttention(64, 4, dtype=dtype, **kwargs).train(training)
    theirs = torch.nn.MultiheadAttention(64, 4, dtype=dtype, **kwargs).train(training)
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())
    x64 = torch.randn(2, 300, 64, dtype=torch.float64)
    padding = torch.zeros(2, 300, dtype=torch.bool)
    padding[1, 200:] = True
    x = x64.to(dtype)
    with torch.set_grad_enabled(training):
        ref_out, ref_w = exact(x64, x64, x64, key_padding_mask=padding, need_weights=need_weights)
        out, w = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        t_out, t_w = theirs(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    assert out.dtype == dtype

    def err(a, b):
        return (a.double() - b).abs().max().item()

    eps = torch.finfo(dtype).eps
    assert err(out, ref_out) <= 2 * err(t_out, ref_out) + eps
    if need_weights:
        assert w.dtype == dtype
        assert err(w, ref_w) <= 2 * err(t_w, ref_w) + eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("mask_shape", "is_causal"),  # the causal flag comes alone: attention() folds it otherwise
    [(None, False), (None, True), ((5, 7), False), ((2, 1, 1, 7), False), ((2, 3, 5, 7), False)],
)
def test_double_backward_wrapper_runs_sdpas_own_kernels(dtype, mask_shape, is_causal):
    """multihead.functional.sdpa (the SDPA path under autograd, made twice differentiable)
    calls SDPA's CPU flash kernel and its backward directly where SDPA takes them: the output
    and first gradients are SDPA's, bit for bit (the very same kernels on the same inputs)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 4, generator=gen).transpose(1, 2).to(dtype)  # non-contiguous
    k, v = (torch.randn(2, 3, 7, 4, generator=gen).to(dtype) for _ in range(2))
    mask = None if mask_shape is None else torch.randn(mask_shape, generator=gen).to(dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = multihead.functional.sdpa(*ours, mask, dropout_p=0.0, is_causal=is_causal)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *theirs, attn_mask=mask, is_causal=is_causal
    )
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    assert torch.equal(out, ref)
    for a, b in zip(
        torch.autograd.grad(out, ours, grad), torch.autograd.grad(ref, theirs, grad), strict=True
    ):
        assert torch.equal(a, b)
