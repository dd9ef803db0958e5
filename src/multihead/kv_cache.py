"""A preallocated key/value cache for incremental decoding.

Shape legend: N batch, Hkv key/value heads, M max_len, T new tokens, D head dim.

The buffers keep one static shape ``(N, Hkv, M, D)``; the layer always attends over all M slots
with a causal mask from the fill level, so the shapes that torch.compile sees never change from
token to token. Slots past the fill level are masked by causality (a query at position p sees
keys at positions <= p).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, ``(N, Hkv, M, D)`` each, and the fill level.

    Made by :meth:`multihead.MultiheadAttention.new_cache`; pass it as ``cache=`` to forward.
    The buffers are not part of the state_dict. A cache belongs to one layer: the layer that
    made it, or the first one it is passed to (a cache built directly, or copied / unpickled,
    has no owner until then); another layer refuses it.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"Invalid argument `dtype`: expected a floating-point dtype for the keys and "
                f"values. Received: dtype={dtype}."
            )
        self._owner: weakref.ref | None = None  # the layer, held weakly; see owned_by
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The fill level: a tensor, not a Python int, so that torch.compile traces one graph
        # for every step instead of specialising on (and recompiling for) each position.
        position = torch.zeros((), dtype=torch.long, device=device)
        self.register_buffer("position", position, persistent=False)

    @property
    def length(self) -> int:
        """Slots filled; the next token goes to this position."""
        return int(self.position)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def owned_by(self, layer: nn.Module) -> bool:
        """Whether ``layer`` may use this cache: it is the owner, or the cache has none yet."""
        owner = None if self._owner is None else self._owner()
        return owner is None or owner is layer

    def claim(self, layer: nn.Module) -> None:
        """Makes ``layer`` the owner when the cache has none (the caller has checked
        :meth:`owned_by`); a no-op on every later step."""
        if self._owner is None or self._owner() is None:
            self._owner = weakref.ref(layer)

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Writes ``(N, Hkv, T, D)`` new keys and values at the fill level and advances it.

        Returns the whole buffers ``(N, Hkv, M, D)``. The caller checks the room, device and
        shapes first; values are stored in the cache's dtype (under autocast the new keys may
        come in a lower precision).
        """
        if (
            not torch.compiler.is_compiling()
            and self.k.is_inference()
            and not torch.is_inference_mode_enabled()
        ):
            # Made under inference_mode, used outside it: inference tensors cannot be written
            # there, so the buffers become ordinary tensors (one copy, once).
            self.k, self.v, self.position = self.k.clone(), self.v.clone(), self.position.clone()
        slots = self.position + torch.arange(k_new.shape[2], device=self.position.device)
        if k_new.dtype != self.k.dtype:  # under autocast: stored in the cache's precision
            k_new, v_new = k_new.to(self.k.dtype), v_new.to(self.v.dtype)
        self.k.index_copy_(2, slots, k_new)
        self.v.index_copy_(2, slots, v_new)
        self.position += k_new.shape[2]
        return self.k, self.v

    def undo_point(self, tokens: int) -> tuple:
        """What :meth:`undo` needs to take back the next :meth:`update` of ``tokens`` tokens
        and a :meth:`claim`: the buffers, the fill level, the slots about to be written and
        the owner (a failed call then leaves the cache bitwise as it was)."""
        start = int(self.position)
        stop = min(start + tokens, self.max_len)
        return (
            self.k,
            self.v,
            self.position,
            start,
            self.k[:, :, start:stop].clone(),
            self.v[:, :, start:stop].clone(),
            self._owner,
        )

    def undo(self, point: tuple) -> None:
        """Restores the cache to :meth:`undo_point`'s state."""
        k, v, position, start, old_k, old_v, owner = point
        if self.k is k:  # written in place (not into a copy of inference-mode buffers)
            k[:, :, start : start + old_k.shape[2]] = old_k
            v[:, :, start : start + old_v.shape[2]] = old_v
            position.fill_(start)
        self.k, self.v, self.position, self._owner = k, v, position, owner

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled; a copy starts without an owner.
        state = self.__dict__.copy()
        state["_owner"] = None
        return state

    def reset(self) -> None:
        """Empties the cache (the buffers keep their memory)."""
        self.position.zero_()

    def extra_repr(self) -> str:
        n, hkv, m, d = self.k.shape
        return (
            f"batch_size={n}, num_kv_heads={hkv}, max_len={m}, head_dim={d}, length={self.length}"
        )
