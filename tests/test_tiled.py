"""The tiled kernel: its fast route equals its formula route, hidden tiles are never computed,
and no ``(L, S)`` tensor is made for a mod, a window or segments (forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import multihead
from multihead import MultiheadAttention, mods, tiled
from multihead.attention_mask import TILE, AttentionMask

F64 = torch.float64


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def banded(b, h, q_idx, kv_idx):
    """A user mod (no tile knowledge): a band of 40 keys behind each query, every other key."""
    behind = q_idx - kv_idx
    return (behind >= 0) & (behind < 40) & (kv_idx % 2 == 0)


def rows_without_keys(b, h, q_idx, kv_idx):
    """Hides every key from queries 130..139 (a block with empty rows), causal elsewhere."""
    return (kv_idx <= q_idx) & ((q_idx < 130) | (q_idx >= 140))


def two_tiles(b, h, q_idx, kv_idx):
    """Key tiles 0 and 2 only (tile 1 hidden): the visible columns are not contiguous."""
    return (kv_idx < 128) | ((kv_idx >= 256) & (kv_idx < 280) & (kv_idx <= q_idx + 200))


MODS = {
    "two_tiles": two_tiles,
    "window": mods.sliding_window(50),
    "window_bidirectional": mods.sliding_window(30, causal=False),
    "document": mods.document(torch.arange(300) // 70),
    "prefix": mods.prefix_lm(20),
    "banded_user_mod": banded,
    "empty_rows": rows_without_keys,
    "or": mods.or_masks(mods.sliding_window(10), mods.prefix_lm(5)),
}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("name", sorted(MODS))
def test_the_flash_route_equals_the_formula_route(name, kv_heads):
    """Outputs and q/k/v gradients of the fused route (SDPA's CPU flash kernel per block, as
    one autograd node) equal the formula route's in float64, with GQA and ragged tiles."""
    gen = torch.Generator().manual_seed(7)
    q = randn(gen, 2, 4, 300, 8).requires_grad_()
    k = randn(gen, 2, kv_heads, 300, 8).requires_grad_()
    v = randn(gen, 2, kv_heads, 300, 8).requires_grad_()
    mask = AttentionMask(
        batch=2, heads=4, query_len=300, key_len=300, mask_mod=MODS[name], dtype=F64
    )
    fast, _ = tiled.tiled_attention(q, k, v, mask)
    slow, _ = tiled.tiled_attention(q, k, v, mask, formula=True)
    if tiled._flash_direct(q, k, v):  # the route under test is the one taken
        assert type(fast.grad_fn).__name__ == "_TiledFlashBackward"
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    upstream = randn(gen, *fast.shape)
    for ours, theirs in zip(
        torch.autograd.grad(fast, (q, k, v), upstream),
        torch.autograd.grad(slow, (q, k, v), upstream),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    if name == "empty_rows":
        assert fast[:, :, 130:140].abs().max() == 0


def test_double_backward_through_the_flash_route():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn(gen, 1, 2, 9, 4).requires_grad_() for _ in range(3))

    def call(q, k, v):
        return multihead.attention(q, k, v, mask_mod=mods.sliding_window(3))[0]

    assert torch.autograd.gradgradcheck(call, (q, k, v))


def computed_columns(monkeypatch) -> list[tuple[int, int]]:
    """Records (rows, key columns) of every block the flash route computes."""
    seen: list[tuple[int, int]] = []
    real = tiled._FLASH_CPU

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(tiled, "_FLASH_CPU", recording)
    return seen


def test_hidden_tiles_are_never_computed(monkeypatch):
    """Window 64 over 1024 tokens: each block of 128 queries computes at most the two key
    tiles its window reaches; a user mod without tile knowledge is evaluated and its hidden
    tiles are dropped the same way; documents aligned to tiles need exactly their own."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (randn(gen, 1, 2, 1024, 8) for _ in range(3))
    if not tiled._flash_direct(q, k, v):
        pytest.skip("SDPA's CPU flash kernel is not available here")
    seen = computed_columns(monkeypatch)
    with torch.no_grad():
        multihead.attention(q, k, v, mask_mod=mods.sliding_window(64))
    assert len(seen) == 1024 // TILE
    assert all(cols <= 2 * TILE for _, cols in seen)
    assert sum(cols for _, cols in seen) < 1024 * 1024 // TILE / 3  # far below the dense grid
    seen.clear()
    with torch.no_grad():
        multihead.attention(q, k, v, mask_mod=banded)
    assert all(cols <= 2 * TILE for _, cols in seen)
    seen.clear()
    with torch.no_grad():
        multihead.attention(q, k, v, mask_mod=mods.document(torch.arange(1024) // 256))
    assert [cols for _, cols in seen] == [256] * 8


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for x in result if isinstance(result, tuple | list) else (result,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return result


@pytest.mark.parametrize(
    "options",
    [
        dict(window=64),
        dict(segment_ids=True),
        dict(mask_mod=mods.sliding_window(64)),
        dict(mask_mod=banded),
        dict(score_mod=mods.alibi(mods.alibi_slopes(1)), mask_mod=mods.sliding_window(64)),
    ],
    ids=["window", "segment_ids", "mask_mod", "user_mask_mod", "score_mod"],
)
def test_no_op_makes_an_l_by_s_tensor(options):
    """A window, segments or mods on 1024 tokens, forward and backward through the layer: no
    op makes a tensor of L * S elements or more (the dense mask would be 1M)."""
    length = 1024
    layer = MultiheadAttention(8, 1, batch_first=True, dtype=F64)
    if "window" in options:
        layer.window = options.pop("window")
    if options.pop("segment_ids", False):
        options["segment_ids"] = (torch.arange(length) // 100).view(1, length)
    x = torch.randn(1, length, 8, dtype=F64, requires_grad=True)
    with LargestTensor() as mode:
        out, _ = layer(x, x, x, is_causal=True, need_weights=False, **options)
        out.sum().backward()
    assert mode.largest < length * length // 4, mode.largest
    assert x.grad is not None and torch.isfinite(x.grad).all()
