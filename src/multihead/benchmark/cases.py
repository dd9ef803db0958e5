"""The benchmark grid: which shapes run in which modes, and how many FLOPs each case does.

Shape legend: N batch, L query length, S key length (S = L: every case is self-attention),
E embed dim, H heads, D head dim (E / H).

Modes (all ``batch_first=True``, fp32, query is key is value):

- ``infer``: ``eval()`` under ``torch.no_grad()``, ``need_weights=False``.
- ``infer_weights``: ``eval()`` under ``torch.no_grad()``, the default call (averaged weights).
- ``train``: ``train()`` with dropout 0, the default call, forward and backward of
  ``out.sum()`` into the input and the parameters.
- ``causal``: as ``infer``, with the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("infer", "infer_weights", "train", "causal")

# Modes whose call returns no weights: the only ones an exported ONNX graph can stand in for.
ONNX_MODES = ("infer", "causal")

# Torch materialises (N, H, L, S) fp32 weights for infer_weights and train; past this many
# bytes its case is skipped (our layer never builds that tensor, so ours still runs).
TORCH_WEIGHTS_LIMIT_BYTES = 6 * 2**30

# Training at L=8192 takes minutes a round on a 2-core machine.
TRAIN_MAX_LEN = 4096

SEED_SHAPE = (2, 5, 16, 4)  # (N, L, E, H) of the seed example


@dataclass(frozen=True)
class Case:
    """One benchmark case: a mode and an ``(N, L, E, H)`` shape."""

    mode: str
    batch: int
    seq_len: int
    embed_dim: int
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def shape(self) -> str:
        return f"N{self.batch} L{self.seq_len} E{self.embed_dim} H{self.num_heads}"

    @property
    def name(self) -> str:
        return f"{self.mode} {self.shape}"

    @property
    def causal(self) -> bool:
        return self.mode == "causal"


def flops(case: Case) -> int:
    """Floating-point operations of one call of ``case`` (multiply and add counted apart).

    Forward: in-projection ``2 N L E 3E``, out-projection ``2 N L E E``, attention
    ``4 N H L S D`` (scores and weighted sum), half of that when causal. Training counts three
    forwards (the backward does two matmuls for each one of the forward).
    """
    n, length, e, h, d = case.batch, case.seq_len, case.embed_dim, case.num_heads, case.head_dim
    projections = 2 * n * length * e * 3 * e + 2 * n * length * e * e
    attention = 4 * n * h * length * length * d
    if case.causal:
        attention //= 2
    forward = projections + attention
    return 3 * forward if case.mode == "train" else forward


def torch_weights_bytes(case: Case) -> int:
    """Bytes of the fp32 ``(N, H, L, S)`` weights torch builds for ``case``."""
    return 4 * case.batch * case.num_heads * case.seq_len * case.seq_len


def torch_skip_reason(case: Case) -> str | None:
    """Why torch's layer is left out of ``case``, or None when it runs."""
    if case.mode not in ("infer_weights", "train"):
        return None
    size = torch_weights_bytes(case)
    if size <= TORCH_WEIGHTS_LIMIT_BYTES:
        return None
    return (
        f"torch skipped: its (N, H, L, S) fp32 weights would take {size / 2**30:.1f} GiB "
        f"(limit {TORCH_WEIGHTS_LIMIT_BYTES / 2**30:.0f} GiB)"
    )


def _grid(shapes: list[tuple[int, int, int, int]], modes: tuple[str, ...]) -> list[Case]:
    cases = []
    for mode in modes:
        for n, length, e, h in shapes:
            if mode == "train" and length > TRAIN_MAX_LEN:
                continue
            cases.append(Case(mode, n, length, e, h))
    return cases


# Shapes timed in training only: a mid-size batch, the most common training call.
TRAIN_ONLY_SHAPES = [(8, 256, 512, 8)]


def full_grid(modes: tuple[str, ...] = MODES) -> list[Case]:
    """Seed shape, N16 L256, and N1 L512..8192 at E512 H8, in every mode of ``modes``, and
    N8 L256 in training."""
    shapes = [SEED_SHAPE, (16, 256, 512, 8)]
    shapes += [(1, length, 512, 8) for length in (512, 1024, 2048, 4096, 8192)]
    cases = _grid(shapes, modes)
    if "train" in modes:
        at = max(i for i, case in enumerate(cases) if case.mode == "train") + 1
        cases[at:at] = _grid(TRAIN_ONLY_SHAPES, ("train",))
    return cases


def quick_grid(modes: tuple[str, ...] = MODES) -> list[Case]:
    """Seed shape and N1 L2048 E512 H8 in every mode, plus N16 L256 ``infer``."""
    cases = _grid([SEED_SHAPE, (1, 2048, 512, 8)], modes)
    if "infer" in modes:
        cases.append(Case("infer", 16, 256, 512, 8))
    return cases


def memory_in_quick(case: Case) -> bool:
    """Whether ``--quick`` measures the peak memory of ``case`` (the L=2048 cases only: each
    measurement starts two fresh interpreters)."""
    return case.seq_len == 2048
