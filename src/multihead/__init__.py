"""multihead: an exact drop-in for ``torch.nn.MultiheadAttention``, faster and broader."""

from .functional import attention, attention_weights
from .layer import MultiheadAttention
from .masks import canonical_mask, causal_mask

__all__ = [
    "MultiheadAttention",
    "attention",
    "attention_weights",
    "canonical_mask",
    "causal_mask",
]
__version__ = "0.1.0"
