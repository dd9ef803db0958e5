"""Builders shared by the tests: configurations, paired layers, inputs and masks."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import multihead

DTYPE = torch.float64


@dataclass(frozen=True)
class Config:
    """One layer construction plus one forward call."""

    num_heads: int
    head_dim: int
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False
    batched: bool = True
    batch: int = 2
    query_len: int = 3
    key_len: int = 4
    sharing: str = "distinct"  # "self" (query is key is value), "kv" (key is value), "distinct"
    key_padding_mask: str | None = None  # None, "bool", "float"
    attn_mask: str | None = None  # None, "bool2d", "bool3d", "float2d", "float3d", "causal"
    is_causal: bool = False
    need_weights: bool = True
    average_attn_weights: bool = True
    training: bool = True

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    def layer_kwargs(self) -> dict:
        return dict(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            bias=self.bias,
            add_bias_kv=self.add_bias_kv,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            dtype=DTYPE,
        )


@st.composite
def configs(draw) -> Config:
    """Random configurations covering every constructor option and every mask kind."""
    num_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 4))
    kdim = draw(st.none() | st.integers(1, 7))
    vdim = draw(st.none() | st.integers(1, 7))
    embed = num_heads * head_dim
    packed = (kdim or embed) == embed and (vdim or embed) == embed
    sharing = draw(st.sampled_from(["self", "kv", "distinct"])) if packed else "distinct"
    if sharing == "kv" and (kdim or embed) != (vdim or embed):
        sharing = "distinct"
    query_len = draw(st.integers(1, 5))
    key_len = query_len if sharing == "self" else draw(st.integers(1, 5))
    is_causal = draw(st.booleans()) and query_len == key_len
    attn_kinds = ["bool2d", "bool3d", "float2d", "float3d"]
    attn_mask = "causal" if is_causal else draw(st.none() | st.sampled_from(attn_kinds))
    return Config(
        num_heads=num_heads,
        head_dim=head_dim,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        kdim=kdim,
        vdim=vdim,
        batch_first=draw(st.booleans()),
        batched=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        query_len=query_len,
        key_len=key_len,
        sharing=sharing,
        key_padding_mask=draw(st.none() | st.sampled_from(["bool", "float"])),
        attn_mask=attn_mask,
        is_causal=is_causal,
        need_weights=draw(st.booleans()),
        average_attn_weights=draw(st.booleans()),
        training=draw(st.booleans()),
    )


def make_layers(cfg: Config, seed: int = 0):
    """Ours and torch's layer built under the same seed, then given identical random
    parameters (non-zero biases too) through a strict state_dict load."""
    torch.manual_seed(seed)
    ours = multihead.MultiheadAttention(**cfg.layer_kwargs())
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(**cfg.layer_kwargs())
    init_equal = all(
        torch.equal(a, b)
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True)
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.train(cfg.training)
    theirs.train(cfg.training)
    return ours, theirs, init_equal


def make_inputs(cfg: Config, seed: int = 0):
    """query, key, value in the layer's layout, as leaves that require grad; shared tensors
    when ``cfg.sharing`` says so."""
    gen = torch.Generator().manual_seed(seed + 2)

    def tensor(seq: int, feat: int) -> torch.Tensor:
        if not cfg.batched:
            shape = (seq, feat)
        elif cfg.batch_first:
            shape = (cfg.batch, seq, feat)
        else:
            shape = (seq, cfg.batch, feat)
        return torch.randn(shape, generator=gen, dtype=DTYPE).requires_grad_()

    e = cfg.embed_dim
    query = tensor(cfg.query_len, e)
    if cfg.sharing == "self":
        return query, query, query
    key = tensor(cfg.key_len, cfg.kdim or e)
    if cfg.sharing == "kv":
        return query, key, key
    return query, key, tensor(cfg.key_len, cfg.vdim or e)


def make_masks(cfg: Config, seed: int = 0, allow_empty_rows: bool = False):
    """(key_padding_mask, attn_mask) for ``cfg``. Unless ``allow_empty_rows``, key 0 is never
    masked, so no query row is fully masked (torch gives NaN there; we give zeros)."""
    gen = torch.Generator().manual_seed(seed + 3)
    n = cfg.batch if cfg.batched else 1
    h, q_len, s_len = cfg.num_heads, cfg.query_len, cfg.key_len

    def bool_mask(shape):
        m = torch.rand(shape, generator=gen) < 0.4
        if not allow_empty_rows:
            m[..., 0] = False
        return m

    def float_mask(shape):
        m = torch.randn(shape, generator=gen, dtype=DTYPE)
        m = m.masked_fill(bool_mask(shape), float("-inf"))
        return m

    kpm = None
    if cfg.key_padding_mask is not None:
        shape = (n, s_len) if cfg.batched else (s_len,)
        kpm = bool_mask(shape) if cfg.key_padding_mask == "bool" else float_mask(shape)
    attn = None
    kind = cfg.attn_mask
    if kind == "causal":
        attn = torch.ones(q_len, s_len, dtype=torch.bool).triu(1)
    elif kind is not None:
        shape = (q_len, s_len) if kind.endswith("2d") else (n * h, q_len, s_len)
        attn = bool_mask(shape) if kind.startswith("bool") else float_mask(shape)
    return kpm, attn


def to_batch_first(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The layer-layout tensor as ``(N, L, E)``."""
    if not cfg.batched:
        return x.unsqueeze(0)
    return x if cfg.batch_first else x.transpose(0, 1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo process group or torchrun)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
