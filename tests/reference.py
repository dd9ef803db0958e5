"""A naive float64 NumPy multi-head attention, written from the formula. Independent of src/.

Shape legend: N batch, L query length, S key length, E embed dim, H heads, D = E / H.

For every batch n and head h:
    q_h = (x_q W_q^T + b_q)[:, hD:(h+1)D]       (and k_h, v_h likewise)
    k_h, v_h get the bias_k / bias_v row appended, then an all-zero row (add_zero_attn)
    A = q_h k_h^T / sqrt(D) + attn_mask + key_padding_mask (+ -inf above the diagonal if causal)
    P = softmax(A) row by row; a row that is all -inf attends to nothing: P row = 0
    o_h = P v_h
    out = concat_h(o_h) W_o^T + b_o
Masks: bool True -> -inf (masked), float -> added. Extra key slots are never masked.
"""

from __future__ import annotations

import numpy as np


def _additive(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == np.bool_:
        return np.where(mask, -np.inf, 0.0)
    return mask.astype(np.float64)


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    for i, row in enumerate(a):
        if np.all(row == -np.inf):
            continue  # attends to nothing
        e = np.exp(row - row.max())
        out[i] = e / e.sum()
    return out


def mha_reference(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    *,
    num_heads: int,
    w_q: np.ndarray,
    w_k: np.ndarray,
    w_v: np.ndarray,
    b_in: np.ndarray | None,
    w_o: np.ndarray,
    b_o: np.ndarray | None,
    bias_k: np.ndarray | None = None,
    bias_v: np.ndarray | None = None,
    add_zero_attn: bool = False,
    key_padding_mask: np.ndarray | None = None,
    attn_mask: np.ndarray | None = None,
    is_causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch-first reference.

    Args:
        query ``(N, L, E)``, key ``(N, S, Ek)``, value ``(N, S, Ev)``; weights as torch stores
        them (``(out, in)``); ``b_in`` the packed ``(3E,)`` bias; ``bias_k``/``bias_v`` ``(E,)``;
        key_padding_mask ``(N, S)``; attn_mask ``(L, S)`` or ``(N * H, L, S)``.

    Returns:
        out ``(N, L, E)`` and per-head weights ``(N, H, L, S + X)``.
    """
    n_batch, q_len, embed = query.shape
    s_len = key.shape[1]
    d = embed // num_heads
    b_q, b_k, b_v = (np.zeros(embed),) * 3 if b_in is None else np.split(b_in, 3)
    extra = int(bias_k is not None) + int(add_zero_attn)
    out = np.zeros((n_batch, q_len, embed))
    weights = np.zeros((n_batch, num_heads, q_len, s_len + extra))
    for n in range(n_batch):
        q = query[n] @ w_q.T + b_q  # (L, E)
        k = key[n] @ w_k.T + b_k  # (S, E)
        v = value[n] @ w_v.T + b_v
        if bias_k is not None:
            k = np.vstack([k, bias_k[None]])
            v = np.vstack([v, bias_v[None]])
        if add_zero_attn:
            k = np.vstack([k, np.zeros((1, embed))])
            v = np.vstack([v, np.zeros((1, embed))])
        heads = []
        for h in range(num_heads):
            sl = slice(h * d, (h + 1) * d)
            a = q[:, sl] @ k[:, sl].T / np.sqrt(d)  # (L, S + X)
            real = np.zeros((q_len, s_len))
            if attn_mask is not None:
                m = attn_mask if attn_mask.ndim == 2 else attn_mask[n * num_heads + h]
                real = real + _additive(m)
            if key_padding_mask is not None:
                real = real + _additive(key_padding_mask[n])[None, :]
            if is_causal:
                i, j = np.indices((q_len, s_len))
                real = np.where(j > i, -np.inf, real)
            a[:, :s_len] += real
            p = _softmax_rows(a)
            weights[n, h] = p
            heads.append(p @ v[:, sl])
        out[n] = np.hstack(heads) @ w_o.T + (0.0 if b_o is None else b_o)
    return out, weights


def reference_from_layer(layer, query, key, value, **masks) -> tuple[np.ndarray, np.ndarray]:
    """Runs :func:`mha_reference` with a layer's parameters (torch's or ours) on batch-first
    NumPy inputs. Reads parameters only; never calls the layer."""

    def np_(t):
        return None if t is None else t.detach().double().numpy()

    e = layer.embed_dim
    if layer.in_proj_weight is not None:
        w_q, w_k, w_v = np.split(np_(layer.in_proj_weight), 3)
    else:
        w_q, w_k, w_v = np_(layer.q_proj_weight), np_(layer.k_proj_weight), np_(layer.v_proj_weight)
    return mha_reference(
        query,
        key,
        value,
        num_heads=layer.num_heads,
        w_q=w_q,
        w_k=w_k,
        w_v=w_v,
        b_in=np_(layer.in_proj_bias),
        w_o=np_(layer.out_proj.weight),
        b_o=np_(layer.out_proj.bias),
        bias_k=None if layer.bias_k is None else np_(layer.bias_k).reshape(e),
        bias_v=None if layer.bias_v is None else np_(layer.bias_v).reshape(e),
        add_zero_attn=layer.add_zero_attn,
        **masks,
    )
