"""Whether a call runs under torch.func transforms or forward-mode AD.

Those need every op to have a batching rule and a forward derivative, and to avoid
data-dependent Python control flow (``bool(tensor)``). Our custom autograd Functions, our
inference shortcuts (``out=`` scratch, data-dependent mask checks) and SDPA's CPU flash kernel
(no forward AD, no batching rule) do not qualify, so such calls take plain-op paths.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

# Looked up once: this runs on every call, decoding steps included.
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_IS_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def functional_autodiff(*tensors: Tensor | None) -> bool:
    """Whether any tensor is traced by torch.func (grad, vmap, jacrev, jvp, ...) or carries a
    forward-mode tangent (``torch.autograd.forward_ad``).

    Those transforms need every op to have a batching rule and a forward derivative, and our
    custom autograd Functions and fused kernels (SDPA's CPU flash kernel has neither forward AD
    nor a batching rule) do not: such calls take the explicit path, made of plain ops only.
    Outside any transform and dual level (the usual case) no tensor is looked at.
    """
    if torch.compiler.is_compiling():
        return False  # torch.compile traces the plain ops itself; these checks do not trace
    present = [t for t in tensors if t is not None]
    if _TRANSFORMS_ACTIVE is not None and _TRANSFORMS_ACTIVE():
        return True
    if _IS_WRAPPED is not None and _TRANSFORMS_ACTIVE is None:  # older torch: ask each tensor
        if any(_IS_WRAPPED(t) for t in present):
            return True
    if forward_ad._current_level < 0:
        return False  # no dual level is open, so no tensor carries a tangent
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)
