"""The ONNX Runtime column: our layer exported with ``torch.onnx.export(dynamo=True)``, run by
ORT's CPU provider, timed beside ours and torch's.

Only calls without weights (``need_weights=False``) are exported: the graph returns the
attention output alone. When our layer does not export, torch's is tried, and the result says
which one ran. Anything missing or failing becomes a note in the result, never an exception.

Shape legend: N batch, L query length, S key length, E embed dim.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .cases import ONNX_MODES, Case

# ORT's output must match torch's this closely (max |difference|) before it is timed.
TOLERANCE = 1e-4


@dataclass
class OrtColumn:
    """ORT's call for a case, or why there is none.

    Attributes:
        call: runs the ORT session on the case's input; None when ORT is not timed.
        layer: ``"ours"`` or ``"torch"``, the layer whose export runs; empty when none.
        note: why ``call`` is None, or which export failed before the one that runs.
    """

    call: Callable[[], object] | None
    layer: str
    note: str


class _FixedArguments(nn.Module):
    """``layer(x, x, x, **kwargs)[0]`` as a one-input module, so the export sees one tensor."""

    def __init__(self, layer: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.layer = layer
        self.kwargs = kwargs

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, x, x, **self.kwargs)[0]


def _export_kwargs(case: Case, layer_name: str, x: Tensor) -> dict:
    if not case.causal:
        return {"need_weights": False}
    if layer_name == "ours":
        return {"need_weights": False, "is_causal": True}
    float_mask = nn.Transformer.generate_square_subsequent_mask(case.seq_len)  # (L, S)
    return {"need_weights": False, "attn_mask": float_mask.to(x.device), "is_causal": True}


@contextlib.contextmanager
def _quiet():
    """Silences the exporter's warnings, log lines and progress prints."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(layer: nn.Module, kwargs: dict, x: Tensor, path: Path) -> None:
    wrapper = _FixedArguments(layer, kwargs).eval()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(wrapper, (x,), dynamo=True, verbose=False)
        program.save(str(path))


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    # Spinning worker threads would keep burning the cores after each ORT call and slow the
    # torch call timed right after it; the interleaved comparison needs them asleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_column(case: Case, layers: dict[str, nn.Module], x: Tensor, reference: Tensor) -> OrtColumn:
    """Exports ``case``'s layer, loads it into ORT and checks it against ``reference``.

    Args:
        case: an ``infer`` or ``causal`` case.
        layers: ``{"ours": ..., "torch": ...}`` in eval mode, with the same weights.
        x: the input ``(N, L, E)``.
        reference: torch's output ``(N, L, E)`` for ``x``.

    Returns:
        The ORT call, or a note saying why ORT is not timed (ORT not installed, not a CPU run,
        export failed for both layers, or a mismatch with torch beyond ``TOLERANCE``).
    """
    if case.mode not in ONNX_MODES:
        return OrtColumn(None, "", f"not exported: mode {case.mode} returns weights")
    if x.device.type != "cpu":
        return OrtColumn(None, "", "ORT runs on CPU only")
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        return OrtColumn(None, "", f"{error.name} not installed (pip install 'multihead[bench]')")

    failures = []
    with tempfile.TemporaryDirectory() as workdir:
        for layer_name in ("ours", "torch"):
            path = Path(workdir) / f"{layer_name}.onnx"
            try:
                _export(layers[layer_name], _export_kwargs(case, layer_name, x), x, path)
                session = _session(path)
            except Exception as error:  # any exporter or ORT failure: try the next layer
                failures.append(f"export of {layer_name} failed: {type(error).__name__}: {error}")
                continue
            break
        else:
            return OrtColumn(None, "", "; ".join(failures)[:300])

    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    out = torch.from_numpy(session.run(None, feed)[0])
    error = (out - reference.detach().cpu()).abs().max().item()
    if not error <= TOLERANCE:
        note = f"ORT output differs from torch's by {error:.2e} (> {TOLERANCE:.0e}); not timed"
        return OrtColumn(None, layer_name, note)
    return OrtColumn(lambda: session.run(None, feed), layer_name, "; ".join(failures)[:300])
