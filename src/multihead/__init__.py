"""multihead: an exact drop-in for ``torch.nn.MultiheadAttention``, faster and broader."""

from . import mods
from .functional import attention, attention_weights
from .kv_cache import KVCache, RollingKVCache
from .layer import MultiheadAttention
from .masks import canonical_mask, causal_mask
from .swap import from_torch, swap, to_torch

__all__ = [
    "KVCache",
    "MultiheadAttention",
    "RollingKVCache",
    "attention",
    "attention_weights",
    "canonical_mask",
    "causal_mask",
    "from_torch",
    "mods",
    "swap",
    "to_torch",
]
__version__ = "0.1.0"
