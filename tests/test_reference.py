"""Our layer against the independent NumPy float64 reference (tests/reference.py).

Unlike the torch comparison this includes what torch cannot serve as oracle for: is_causal
without a mask (any L, S), and fully masked query rows.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from helpers import configs, make_inputs, make_layers, make_masks, to_batch_first
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_from_layer


def _np(x):
    return None if x is None else x.detach().numpy()


@settings(max_examples=300)
@given(cfg=configs(), is_causal=st.booleans(), empty_rows=st.booleans())
def test_matches_numpy_reference(cfg, is_causal, empty_rows, record_error, count_case):
    attn_kind = None if cfg.attn_mask == "causal" else cfg.attn_mask
    cfg = replace(cfg, is_causal=is_causal, attn_mask=attn_kind)
    ours, _, _ = make_layers(cfg)
    kpm, attn = make_masks(cfg, allow_empty_rows=empty_rows)
    inputs = make_inputs(cfg)
    out, w = ours(
        *inputs,
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=cfg.need_weights,
        average_attn_weights=cfg.average_attn_weights,
        is_causal=cfg.is_causal,
    )
    q, k, v = (_np(to_batch_first(x, cfg)) for x in inputs)
    ref_kpm = None if kpm is None else _np(kpm).reshape(q.shape[0], -1)
    ref_out, ref_w = reference_from_layer(
        ours, q, k, v, key_padding_mask=ref_kpm, attn_mask=_np(attn), is_causal=cfg.is_causal
    )
    count_case("vs NumPy reference")
    assert torch.isfinite(out).all()
    got = to_batch_first(out, cfg).detach().numpy()
    np.testing.assert_allclose(got, ref_out, atol=1e-10, rtol=1e-10)
    record_error("vs NumPy: output", torch.from_numpy(got), torch.from_numpy(ref_out))
    if cfg.need_weights:
        ref_w = ref_w.mean(axis=1) if cfg.average_attn_weights else ref_w
        if not cfg.batched:
            ref_w = ref_w[0]
        assert w.shape == ref_w.shape
        np.testing.assert_allclose(w.detach().numpy(), ref_w, atol=1e-12, rtol=1e-10)
        record_error("vs NumPy: weights", w, torch.from_numpy(ref_w))
    (out.sum() + (0 if w is None else w.sum())).backward()
    for p in ours.parameters():
        assert torch.isfinite(p.grad).all()
