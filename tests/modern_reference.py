"""A float64 torch reference for the modern options, written from the formulas, independent of
src/ (it reads the layer's parameters only). Loops over heads and repeats nothing clever.

Per batch n and query head h (key/value head h // G):
    q, k, v = x W^T + b, rows q | k | v of in_proj (k, v have Hkv * D rows)
    qk_norm: x / sqrt(mean(x^2) + 1e-6) * scale           (over D)
    rope:    pair (x_i, x_{i+D/2}) rotated by angle p * base^(-2i/D), p = position
    logits = q k^T / sqrt(D); softcap: c * tanh(logits / c)
    masked (-inf): causal j > i (with positions), window, other segment, padding, attn_mask
    P = softmax, fully masked rows -> 0
    sinks:   P = softmax([logits, sink_h])[:S]                 (gpt-oss; rows sum below 1)
    out = concat_h(P v) [* sigmoid(x W_g^T + b_g) with output_gate] W_o^T + b_o
q has H * D rows (D = head_dim, which need not be E / H).
"""

from __future__ import annotations

import math

import torch


def _rms(x, scale):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * scale


def _rope(x, positions, base):
    d = x.shape[-1]
    half = d // 2
    out = x.clone()
    for i in range(half):
        angle = positions.double() * base ** (-2.0 * i / d)
        c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = x[:, i : i + 1], x[:, i + half : i + half + 1]
        out[:, i : i + 1] = a * c - b * s
        out[:, i + half : i + half + 1] = b * c + a * s
    return out


def modern_reference(
    layer,
    query,
    key,
    value,
    *,
    key_padding_mask=None,
    is_causal=False,
    segment_ids=None,
    query_offset=0,
):
    """Batch-first ``(N, L, E)`` inputs -> out ``(N, L, E)``, weights ``(N, H, L, S)``.

    ``key_padding_mask``: bool ``(N, S)``. Keys sit at positions 0..S-1 and queries at
    ``query_offset``..; with rope, keys are rotated at their positions.
    """
    n_batch, q_len, _ = query.shape
    s_len = key.shape[1]
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    group = h // hkv
    kvd = hkv * d
    qd = h * d
    if layer.in_proj_weight is not None:
        w_q, w_k, w_v = layer.in_proj_weight.split([qd, kvd, kvd])
    else:
        w_q, w_k, w_v = layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight
    if layer.in_proj_bias is not None:
        b_q, b_k, b_v = layer.in_proj_bias.split([qd, kvd, kvd])
    else:
        b_q = b_k = b_v = 0.0
    q_pos = torch.arange(q_len) + query_offset
    k_pos = torch.arange(s_len)
    outs, weights = [], torch.zeros(n_batch, h, q_len, s_len, dtype=query.dtype)
    for n in range(n_batch):
        q_all = query[n] @ w_q.T + b_q
        k_all = key[n] @ w_k.T + b_k
        v_all = value[n] @ w_v.T + b_v
        heads = []
        for head in range(h):
            kv = head // group
            q = q_all[:, head * d : (head + 1) * d]
            k = k_all[:, kv * d : (kv + 1) * d]
            v = v_all[:, kv * d : (kv + 1) * d]
            if layer.qk_norm:
                q, k = _rms(q, layer.q_norm.weight), _rms(k, layer.k_norm.weight)
            if layer.rope:
                q, k = _rope(q, q_pos, layer.rope_base), _rope(k, k_pos, layer.rope_base)
            logits = q @ k.T / math.sqrt(d)
            if layer.softcap is not None:
                logits = layer.softcap * torch.tanh(logits / layer.softcap)
            masked = torch.zeros(q_len, s_len, dtype=torch.bool)
            for i in range(q_len):
                for j in range(s_len):
                    behind = int(q_pos[i]) - j
                    if is_causal and behind < 0:
                        masked[i, j] = True
                    if layer.window is not None:
                        dist = behind if is_causal else abs(behind)
                        if dist >= layer.window:
                            masked[i, j] = True
                    if segment_ids is not None and segment_ids[n, i] != segment_ids[n, j]:
                        masked[i, j] = True
                    if key_padding_mask is not None and key_padding_mask[n, j]:
                        masked[i, j] = True
            logits = logits.masked_fill(masked, float("-inf"))
            sinks = getattr(layer, "sinks", None)
            if sinks is not None:  # one more logit per head, attending to nothing
                column = sinks[head].expand(q_len, 1)
                p = torch.softmax(torch.cat([logits, column], -1), -1)[:, :s_len]
            else:
                empty = masked.all(-1, keepdim=True)
                p = torch.softmax(logits.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
            weights[n, head] = p
            heads.append(p @ v)
        merged = torch.cat(heads, -1)
        if getattr(layer, "output_gate", False):
            gate = layer.gate_proj
            merged = merged * torch.sigmoid(
                query[n] @ gate.weight.T + (0.0 if gate.bias is None else gate.bias)
            )
        out_bias = 0.0 if layer.out_proj.bias is None else layer.out_proj.bias
        outs.append(merged @ layer.out_proj.weight.T + out_bias)
    return torch.stack(outs), weights
