"""FlexAttention-style mods: ``mask_mod`` and ``score_mod`` callables, and the standard ones.

Signatures and polarity are those of ``torch.nn.attention.flex_attention``, so a mod written
for flex works here unchanged, and the reverse:

- ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True means *attend* (flex's polarity; the
  reverse of ``torch.nn.MultiheadAttention``'s bool masks, where True means masked).
- ``score_mod(score, b, h, q_idx, kv_idx) -> score``: transforms one scaled logit.

``b`` is the batch index, ``h`` the *query* head, ``q_idx`` / ``kv_idx`` absolute positions
(with a KV cache, the query at cache position p has ``q_idx == p``). Flex calls a mod on 0-dim
tensors through ``vmap``; we call it once per tile on broadcast index tensors, int64:
``b (N, 1, 1, 1)``, ``h (1, H, 1, 1)``, ``q_idx (1, 1, B, 1)``, ``kv_idx (1, 1, 1, C)``. Any
elementwise mod (comparisons, arithmetic, ``torch.where``, indexing a table) works in both.

The mods shipped here also know which tiles they hide entirely or show entirely
(:meth:`TiledMaskMod.tile_states`), so the tiled kernel skips those tiles without evaluating
the mod there; any other mod is evaluated on the tiles that could be visible. Tiles are
rectangles of positions ``[q_first, q_last] x [k_first, k_last]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "RelativePositionBias",
    "TiledMaskMod",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "causal",
    "document",
    "or_masks",
    "prefix_lm",
    "sliding_window",
    "tanh_softcap",
]


class TiledMaskMod:
    """A mask_mod that can also classify whole tiles (the base of the shipped mask mods).

    Subclasses define ``__call__`` (flex's signature) and :meth:`tile_states`.
    """

    # True when tile_states finds every tile that is hidden entirely (the kernel then trusts
    # it and does not look for more in the mod's values).
    exact_tiles: bool = False
    # True when calling it once on broadcast index tensors gives what flex's per-element
    # calls give (see on_grid); only the mods written here say so.
    broadcast_safe: bool = False

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def tile_states(
        self, q_first: Tensor, q_last: Tensor, k_first: Tensor, k_last: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(empty, full)``, bool ``(Tq, Tk)``: tiles where no pair attends / every pair
        attends, for every batch row and head. ``q_first``/``q_last`` are int64 ``(Tq, 1)``,
        ``k_first``/``k_last`` ``(1, Tk)``, inclusive bounds. Either may be False where unsure
        (the tile is then evaluated), never True wrongly."""
        unsure = torch.zeros(torch.broadcast_shapes(q_first.shape, k_first.shape), dtype=torch.bool)
        return unsure, unsure


def tile_states(
    mask_mod: MaskMod, q_first: Tensor, q_last: Tensor, k_first: Tensor, k_last: Tensor
) -> tuple[Tensor, Tensor]:
    """``(empty, full)`` for any mask_mod: exact bounds for the shipped mods, "unsure"
    (both False) for others."""
    if isinstance(mask_mod, TiledMaskMod):
        return mask_mod.tile_states(q_first, q_last, k_first, k_last)
    return TiledMaskMod.tile_states(None, q_first, q_last, k_first, k_last)  # type: ignore[arg-type]


def on_grid(
    mod: Callable[..., Tensor],
    b: Tensor,
    h: Tensor,
    q_idx: Tensor,
    kv_idx: Tensor,
    score: Tensor | None = None,
) -> Tensor:
    """``mod`` on every (b, h, q_idx, kv_idx) of a grid: b ``(N,)``, h ``(H,)``, q_idx
    ``(B,)``, kv_idx ``(C,)`` int64, and for a score_mod the scores ``(N, H, B, C)``. The
    result broadcasts to ``(N, H, B, C)``.

    The mods shipped here (``broadcast_safe``) are called once on broadcast views
    ``(N, 1, 1, 1)``, ``(1, H, 1, 1)``, ``(1, 1, B, 1)``, ``(1, 1, 1, C)``. Any other mod is
    called through nested ``torch.vmap`` over the four indices, as FlexAttention calls it
    (``_vmap_for_bhqkv``): it sees 0-dim tensors, so chained indexing (``t[h][q_idx]``),
    reductions over an index and shape-dependent code mean exactly what they mean in flex.
    """
    grid = (b, h, q_idx, kv_idx)
    if getattr(mod, "broadcast_safe", False):
        views = [x.view([-1 if i == at else 1 for i in range(4)]) for at, x in enumerate(grid)]
        return mod(*views) if score is None else mod(score, *views)
    fn = mod
    for at in (3, 2, 1, 0):  # innermost kv_idx, outermost b (flex's order)
        dims = tuple(0 if i == at else None for i in range(4))
        fn = torch.vmap(fn, in_dims=dims if score is None else (0, *dims))
    return fn(*grid) if score is None else fn(score, *grid)


def probe(mod: Callable[..., Tensor], score: Tensor | None, *grid: Tensor) -> object:
    """``mod`` on the first point of the grid (0-dim tensors), as a cheap check of what it
    returns before it is mapped over a tile."""
    point = [x[0] for x in grid]
    return mod(*point) if score is None else mod(score.reshape(-1)[0], *point)


class _Causal(TiledMaskMod):
    """Query i attends to keys j <= i (flex's ``causal_mask``)."""

    broadcast_safe = True

    exact_tiles = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx >= kv_idx

    def tile_states(self, q_first, q_last, k_first, k_last):
        return k_first > q_last, k_last <= q_first

    def visible_span(self, q_first: int, q_last: int, key_len: int):
        """``((low, high), full)``: queries ``[q_first, q_last]`` see only keys in
        ``[low, high)``, and every one of them when ``full``."""
        high = min(q_last + 1, key_len)
        return (0, high), high - 1 <= q_first

    def __repr__(self) -> str:
        return "multihead.mods.causal"


causal: TiledMaskMod = _Causal()
"""mask_mod: query position i attends to key positions j <= i."""


class _SlidingWindow(TiledMaskMod):
    broadcast_safe = True
    exact_tiles = True

    def __init__(self, window: int, causal: bool) -> None:
        self.window, self.causal = window, causal

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Bounds on q_idx (small) compared with kv_idx: no (B, C) integer temporary.
        if self.causal:
            return (kv_idx <= q_idx) & (kv_idx > q_idx - self.window)
        return (kv_idx > q_idx - self.window) & (kv_idx < q_idx + self.window)

    def tile_states(self, q_first, q_last, k_first, k_last):
        w = self.window
        if self.causal:  # q - w < k <= q
            empty = (k_first > q_last) | (k_last <= q_first - w)
            full = (k_last <= q_first) & (k_first > q_last - w)
        else:  # q - w < k < q + w
            empty = (k_first >= q_last + w) | (k_last <= q_first - w)
            full = (k_last < q_first + w) & (k_first > q_last - w)
        return empty, full

    def visible_span(self, q_first: int, q_last: int, key_len: int):
        """As :meth:`_Causal.visible_span`, for the window's band."""
        w = self.window
        low = max(q_first - w + 1, 0)
        high = min(q_last + 1 if self.causal else q_last + w, key_len)
        if self.causal:
            full = high - 1 <= q_first and low > q_last - w
        else:
            full = high - 1 < q_first + w and low > q_last - w
        return (low, high), full

    def __repr__(self) -> str:
        return f"multihead.mods.sliding_window({self.window}, causal={self.causal})"


def sliding_window(window: int, *, causal: bool = True) -> TiledMaskMod:
    """mask_mod for a sliding window of ``window`` positions (Longformer, Mistral, Gemma).

    With ``causal``, query i attends to keys ``i - window < j <= i``; without, to keys
    ``|i - j| < window``. The same rule as the layer's ``window=`` option.

    Raises:
        TypeError, ValueError: ``window`` not an int >= 1.
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window: expected an int >= 1, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window}")
    # Positions stay below 2**62, so a longer window hides nothing; capped, it stays in int64.
    return _SlidingWindow(min(window, 2**62), bool(causal))


def _integer_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
    return value


class _Document(TiledMaskMod):
    broadcast_safe = True

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids  # (N, S)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ids = self.ids
        rows = b if ids.shape[0] > 1 else torch.zeros_like(b)
        return ids[rows, q_idx] == ids[rows, kv_idx]

    def _ranges(self, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """Per tile and batch row, the smallest and largest id: ``(N, T)`` each."""
        length = self.ids.shape[-1]
        if int(last.max()) >= length:
            raise ValueError(
                f"document_ids: expected an id for every position up to {int(last.max())}, "
                f"got {length} ids per row"
            )
        lows, highs = [], []
        for a, z in zip(first.flatten().tolist(), last.flatten().tolist(), strict=True):
            span = self.ids[:, a : z + 1]
            lows.append(span.amin(dim=-1))
            highs.append(span.amax(dim=-1))
        return torch.stack(lows, -1), torch.stack(highs, -1)

    def tile_states(self, q_first, q_last, k_first, k_last):
        q_low, q_high = self._ranges(q_first, q_last)  # (N, Tq)
        k_low, k_high = self._ranges(k_first, k_last)  # (N, Tk)
        q_low, q_high = q_low[:, :, None], q_high[:, :, None]
        k_low, k_high = k_low[:, None, :], k_high[:, None, :]
        empty = ((q_high < k_low) | (q_low > k_high)).all(dim=0)
        one_id = (q_low == q_high) & (k_low == k_high) & (q_low == k_low)
        return empty.cpu(), one_id.all(dim=0).cpu()

    def __repr__(self) -> str:
        return f"multihead.mods.document(<ids {tuple(self.ids.shape)}>)"


def document(document_ids: Tensor) -> TiledMaskMod:
    """mask_mod for packed documents: a query attends only to keys of its own document.

    Args:
        document_ids: ``(N, S)`` or ``(S,)`` integer ids, one per position (queries and keys
            share positions: self-attention over a packed row). The same rule as the
            layer's ``segment_ids=``.

    Raises:
        TypeError: ``document_ids`` not an integer tensor. ValueError: not 1-D or 2-D.
    """
    ids = _integer_tensor("document_ids", document_ids)
    if ids.dim() not in (1, 2):
        raise ValueError(f"document_ids: expected (N, S) or (S,), got shape {tuple(ids.shape)}")
    return _Document((ids if ids.dim() == 2 else ids[None]).long())


class _PrefixLM(TiledMaskMod):
    broadcast_safe = True
    exact_tiles = True

    def __init__(self, prefix: int | Tensor) -> None:
        self.prefix = prefix

    def _prefix(self, b: Tensor) -> int | Tensor:
        return self.prefix[b] if isinstance(self.prefix, Tensor) else self.prefix

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) | (kv_idx < self._prefix(b))

    def tile_states(self, q_first, q_last, k_first, k_last):
        prefix = self.prefix
        low, high = (
            (int(prefix.min()), int(prefix.max())) if isinstance(prefix, Tensor) else (prefix,) * 2
        )
        empty = (k_first > q_last) & (k_first >= high)
        full = (k_last <= q_first) | (k_last < low)
        return empty, full

    def __repr__(self) -> str:
        return f"multihead.mods.prefix_lm({self.prefix!r})"


def prefix_lm(prefix_length: int | Tensor) -> TiledMaskMod:
    """mask_mod for a prefix LM (T5, UniLM): keys in the first ``prefix_length`` positions are
    visible to every query (bidirectional prefix); later keys are causal.

    Args:
        prefix_length: an int >= 0, or an ``(N,)`` integer tensor (one per batch row).

    Raises:
        TypeError, ValueError: anything else.
    """
    if isinstance(prefix_length, Tensor):
        prefix = _integer_tensor("prefix_length", prefix_length)
        if prefix.dim() != 1:
            raise ValueError(f"prefix_length: expected (N,), got shape {tuple(prefix.shape)}")
        return _PrefixLM(prefix.long())
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int):
        raise TypeError(
            f"prefix_length: expected an int >= 0 or an (N,) tensor, got "
            f"{type(prefix_length).__name__}"
        )
    if prefix_length < 0:
        raise ValueError(f"prefix_length: expected an int >= 0, got {prefix_length}")
    return _PrefixLM(prefix_length)


class _Combined(TiledMaskMod):
    def __init__(self, mods: tuple[MaskMod, ...], both: bool) -> None:
        self.mods, self.both = mods, both
        # A union is hidden where every part is; an intersection may be hidden where no part
        # is, which the parts' states cannot tell.
        self.exact_tiles = not both and all(getattr(mod, "exact_tiles", False) for mod in mods)
        self.broadcast_safe = all(getattr(mod, "broadcast_safe", False) for mod in mods)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = torch.full((), self.both, dtype=torch.bool, device=q_idx.device)
        for mod in self.mods:
            part = mod(b, h, q_idx, kv_idx)
            if not isinstance(part, Tensor) or part.dtype != torch.bool:
                got = f"dtype {part.dtype}" if isinstance(part, Tensor) else type(part).__name__
                raise TypeError(
                    f"mask_mod: expected every combined mask_mod to return a bool tensor "
                    f"(True = attend), got {got} from {mod!r}"
                )
            result = (result & part) if self.both else (result | part)
        return result

    def tile_states(self, q_first, q_last, k_first, k_last):
        if not self.mods:  # and_masks(): everything shown; or_masks(): everything hidden
            shape = torch.broadcast_shapes(q_first.shape, k_first.shape)
            return torch.full(shape, not self.both), torch.full(shape, self.both)
        states = [tile_states(mod, q_first, q_last, k_first, k_last) for mod in self.mods]
        shape = torch.broadcast_shapes(q_first.shape, k_first.shape)
        empties = torch.stack([e.expand(shape) for e, _ in states])
        fulls = torch.stack([f.expand(shape) for _, f in states])
        if self.both:  # hidden if any hides it; shown if all show it
            return empties.any(0), fulls.all(0)
        return empties.all(0), fulls.any(0)

    def __repr__(self) -> str:
        name = "and_masks" if self.both else "or_masks"
        return f"multihead.mods.{name}({', '.join(map(repr, self.mods))})"


def _check_mods(name: str, mods: tuple[object, ...]) -> tuple[MaskMod, ...]:
    for mod in mods:
        if not callable(mod):
            raise TypeError(f"{name}: expected callable mask_mods, got {type(mod).__name__}")
    return mods  # type: ignore[return-value]


def and_masks(*mask_mods: MaskMod) -> TiledMaskMod:
    """mask_mod that attends where every one of ``mask_mods`` attends (flex's ``and_masks``;
    with none, everywhere); it keeps the shipped mods' tile knowledge, so skipping still
    works."""
    return _Combined(_check_mods("and_masks", mask_mods), both=True)


def or_masks(*mask_mods: MaskMod) -> TiledMaskMod:
    """mask_mod that attends where any of ``mask_mods`` attends (flex's ``or_masks``; with
    none, nowhere)."""
    return _Combined(_check_mods("or_masks", mask_mods), both=False)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes ``(H,)`` float32 (Press et al. 2022, "Train Short, Test Long"):
    the geometric sequence ``2^(-8/n), 2^(-16/n), ...`` for n = H a power of two; otherwise
    those of the largest power of two below H, then every other slope of twice that (as the
    paper's code, BLOOM's ``build_alibi_tensor`` and MPT do).

    Raises:
        TypeError, ValueError: ``num_heads`` not an int >= 1.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads: expected an int >= 1, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads: expected an int >= 1, got {num_heads}")

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(slopes: Tensor) -> ScoreMod:
    """score_mod for ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` (a linear penalty on the
    distance to earlier keys; with a causal mask this is the paper's bias).

    Args:
        slopes: ``(H,)`` float tensor, one per query head (:func:`alibi_slopes`); it may
            require grad (learned slopes), and its gradient comes out exact.

    Raises:
        TypeError, ValueError: ``slopes`` not a floating ``(H,)`` tensor.
    """
    if not isinstance(slopes, Tensor) or not slopes.is_floating_point():
        raise TypeError(f"slopes: expected a floating (H,) tensor, got {slopes!r:.60}")
    if slopes.dim() != 1:
        raise ValueError(f"slopes: expected shape (H,), got {tuple(slopes.shape)}")

    def alibi_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    alibi_bias.broadcast_safe = True  # type: ignore[attr-defined]
    return alibi_bias


def tanh_softcap(softcap: float) -> ScoreMod:
    """score_mod ``softcap * tanh(score / softcap)`` (Gemma 2, Grok): the same numbers as the
    layer's ``softcap=`` option.

    Raises:
        TypeError, ValueError: ``softcap`` not a finite number in (0, 1e300].
    """
    from .logits import soft_capped
    from .validation import check_softcap

    cap = check_softcap(softcap)
    if cap is None:
        raise TypeError("softcap: expected a finite number in (0, 1e300], got None")

    def softcap_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return soft_capped(score, cap)

    softcap_score.broadcast_safe = True  # type: ignore[attr-defined]
    return softcap_score


class RelativePositionBias(nn.Module):
    """T5's learned relative-position bias as a score_mod: ``score + weight[bucket, h]``,
    where ``bucket`` buckets ``kv_idx - q_idx`` (Raffel et al. 2020; the formula of Hugging
    Face's ``T5Attention._relative_position_bucket``): half the buckets (all of them when not
    ``bidirectional``, where only keys before the query count) hold exact distances below
    ``num_buckets / 2``, the rest grow logarithmically up to ``max_distance``.

    Args:
        num_heads: H, one bias per bucket and query head.
        num_buckets, max_distance: as T5 (32 and 128).
        bidirectional: True for an encoder, False for a decoder.

    ``weight`` is ``(num_buckets, H)`` (the layout of T5's ``relative_attention_bias.weight``),
    initialised as ``nn.Embedding``. An instance is called as a score_mod, so its gradient
    flows to ``weight``.
    """

    broadcast_safe = True

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value, low in (
            ("num_heads", num_heads, 1),
            ("num_buckets", num_buckets, 2),
            ("max_distance", max_distance, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value}")
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if exact < 1 or max_distance <= exact:
            raise ValueError(
                f"num_buckets, max_distance: expected max_distance above the {exact} exact "
                f"buckets (num_buckets >= {4 if bidirectional else 2}), so that the log-spaced "
                f"buckets are defined; got num_buckets={num_buckets}, "
                f"max_distance={max_distance}"
            )
        super().__init__()
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bool(bidirectional)
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads, device=device, dtype=dtype))
        nn.init.normal_(self.weight)

    def bucket(self, relative_position: Tensor) -> Tensor:
        """Bucket indices (int64, same shape) for ``relative_position = kv_idx - q_idx``."""
        buckets = self.num_buckets
        offset = torch.zeros_like(relative_position)
        if self.bidirectional:
            buckets //= 2
            offset = (relative_position > 0).long() * buckets
            distance = relative_position.abs()
        else:
            distance = (-relative_position).clamp(min=0)
        exact = buckets // 2
        is_small = distance < exact
        # log-spaced buckets for distances in [exact, max_distance); float math as T5's.
        large = (
            exact
            + (
                torch.log(distance.float().clamp(min=1) / exact)
                / math.log(self.max_distance / exact)
                * (buckets - exact)
            ).long()
        )
        large = large.clamp(max=buckets - 1)
        return offset + torch.where(is_small, distance, large)

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """score_mod: ``score + weight[bucket(kv_idx - q_idx), h]``."""
        return score + self.weight[self.bucket(kv_idx - q_idx), h]
