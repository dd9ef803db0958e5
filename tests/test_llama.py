"""GQA + RoPE + causal against a third-party implementation: Hugging Face's Llama attention
(transformers is a test-only dependency; the test skips cleanly without it)."""

from __future__ import annotations

import pytest
import torch

import multihead

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaRotaryEmbedding,
)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_hugging_face_llama_attention(heads, kv_heads, dtype):
    torch.manual_seed(0)
    head_dim, hidden, length = 8, heads * 8, 7
    config = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        rope_theta=500.0,
        attention_bias=False,
    )
    config._attn_implementation = "eager"
    llama = LlamaAttention(config, layer_idx=0).to(dtype)
    rotary = LlamaRotaryEmbedding(config)
    ours = multihead.MultiheadAttention(
        hidden,
        heads,
        bias=False,
        batch_first=True,
        num_kv_heads=kv_heads,
        rope=True,
        rope_base=500.0,
        dtype=dtype,
    )
    with torch.no_grad():  # q / k / v stacked, o_proj -> out_proj
        ours.in_proj_weight.copy_(
            torch.cat([llama.q_proj.weight, llama.k_proj.weight, llama.v_proj.weight])
        )
        ours.out_proj.weight.copy_(llama.o_proj.weight)

    x = torch.randn(2, length, hidden, dtype=dtype)
    positions = torch.arange(length)[None].expand(2, -1)
    causal = torch.full((length, length), float("-inf"), dtype=dtype).triu(1)
    ref, ref_w = llama(x, rotary(x, positions), causal.expand(2, 1, length, length))
    out, w = ours(x, x, x, is_causal=True, average_attn_weights=False)
    # HF computes the rotary cos/sin in float32 even for a float64 model (we use float64
    # there), so float64 agrees to float32 rounding of the angles: about 3e-8 here.
    tol = dict(atol=1e-7, rtol=1e-6) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(w, ref_w, **tol)
    fast, _ = ours(x, x, x, is_causal=True, need_weights=False)  # the SDPA path
    torch.testing.assert_close(fast, ref, **tol)
