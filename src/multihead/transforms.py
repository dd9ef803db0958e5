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


def functional_autodiff(*tensors: Tensor | None) -> bool:
    """Whether any tensor is traced by torch.func (grad, vmap, jacrev, jvp, ...) or carries a
    forward-mode tangent (``torch.autograd.forward_ad``).

    Those transforms need every op to have a batching rule and a forward derivative, and our
    custom autograd Functions and fused kernels (SDPA's CPU flash kernel has neither forward AD
    nor a batching rule) do not: such calls take the explicit path, made of plain ops only.
    """
    if torch.compiler.is_compiling():
        return False  # torch.compile traces the plain ops itself; these checks do not trace
    present = [t for t in tensors if t is not None]
    if _functorch_active() or any(_is_functorch_tensor(t) for t in present):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _is_functorch_tensor(t: Tensor) -> bool:
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(wrapped(t)) if wrapped is not None else False
