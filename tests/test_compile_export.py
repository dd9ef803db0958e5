"""torch.compile (fullgraph, CPU), torch.export and ONNX export of our layer, against eager.

Shapes are tiny on purpose: compilation, not arithmetic, is what costs time here. Each compiled
case is one graph (Inductor, the default backend), and ``fullgraph=True`` makes any graph break
an error. A fresh Dynamo cache per test keeps the recompile limit out of the picture.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

import multihead

# The ONNX exporter goes through torch.jit internals that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

E, H = 8, 2
TOL = dict(atol=1e-5, rtol=1e-5)  # float32: compiled kernels may reassociate sums


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(n: int, length: int, features: int = E, seed: int = 0) -> Tensor:
    return torch.randn(n, length, features, generator=torch.Generator().manual_seed(seed))


def padding(n: int, length: int) -> Tensor:
    """``(N, S)`` bool, True = ignore; the last sequence loses its last two keys."""
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[-1, -2:] = True
    return mask


def seeded() -> torch.Generator:
    """The same masks for the eager and the compiled call."""
    return torch.Generator().manual_seed(5)


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# (id, layer options, call) with call(layer) -> (output, weights); L = 5 unless stated.
INFERENCE = [
    ("self-averaged-weights", {}, lambda m, q, kv: m(q, q, q)),
    (
        "self-causal-no-weights",
        {},
        lambda m, q, kv: m(q, q, q, is_causal=True, need_weights=False),
    ),
    (
        "self-padding-per-head-weights",
        dict(add_bias_kv=True),
        lambda m, q, kv: m(q, q, q, key_padding_mask=padding(2, 5), average_attn_weights=False),
    ),
    (
        "cross-kdim-vdim-masks-no-weights",
        dict(kdim=3, vdim=3),
        lambda m, q, kv: m(
            q,
            kv,
            kv,
            key_padding_mask=padding(2, 7),
            attn_mask=torch.randn(5, 7, generator=seeded()),  # float, added
            need_weights=False,
        ),
    ),
    (
        "cross-bool-3d-mask-weights",
        {},
        lambda m, q, kv: m(q, kv, kv, attn_mask=torch.rand(2 * H, 5, 7, generator=seeded()) < 0.3),
    ),
]


@pytest.mark.parametrize(
    ("options", "call"), [c[1:] for c in INFERENCE], ids=[c[0] for c in INFERENCE]
)
def test_compiled_inference_matches_eager(options, call):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H, batch_first=True, **options).eval()
    query, memory = inputs(2, 5), inputs(2, 7, options.get("kdim", E), seed=1)
    before = graphs_compiled()
    with torch.no_grad():
        expected = call(layer, query, memory)
        out = call(torch.compile(layer, fullgraph=True), query, memory)
    assert graphs_compiled() == before + 1
    torch.testing.assert_close(out[0], expected[0], **TOL)
    if expected[1] is None:
        assert out[1] is None
    else:
        torch.testing.assert_close(out[1], expected[1], **TOL)


def test_compiled_blockwise_weights_path_matches_eager():
    """L = S = 128: enough scores for the inference path that walks query blocks."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H, batch_first=True).eval()
    x = inputs(1, 128)
    with torch.no_grad():
        expected, out = layer(x, x, x), torch.compile(layer, fullgraph=True)(x, x, x)
    torch.testing.assert_close(out[0], expected[0], **TOL)
    torch.testing.assert_close(out[1], expected[1], **TOL)


@pytest.mark.parametrize(
    ("length", "average"),
    [(5, False), (128, True)],
    ids=["explicit-per-head-weights", "recomputed-averaged-weights"],
)
def test_compiled_training_forward_and_backward_match_eager(length, average):
    """Outputs, weights and every gradient, with a padding mask; the loss uses the weights."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H, batch_first=True).train()
    compiled = torch.compile(layer, fullgraph=True)
    mask = padding(2, length)

    def step(module):
        layer.zero_grad()
        x = inputs(2, length).requires_grad_()
        out, weights = module(x, x, x, key_padding_mask=mask, average_attn_weights=average)
        (out.square().sum() + weights.square().sum()).backward()
        return [out, weights, x.grad] + [p.grad.clone() for p in layer.parameters()]

    expected, got = step(layer), step(compiled)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)


class SelfAttention(nn.Module):
    """Causal self-attention, output only: ``(N, L, E) -> (N, L, E)``."""

    def __init__(self, layer: multihead.MultiheadAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, x, x, is_causal=True, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Cross-attention with a padding mask, output only: ``(N, L, E), (N, S, E), (N, S)``."""

    def __init__(self, layer: multihead.MultiheadAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, query: Tensor, memory: Tensor, pad: Tensor) -> Tensor:
        return self.layer(query, memory, memory, key_padding_mask=pad, need_weights=False)[0]


def exportable():
    """The two modules, example inputs, dynamic shapes (N, L, S symbolic), and other inputs
    of new sizes to run the exported program on."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H, batch_first=True).eval()
    n, length, key_len = Dim("N", min=1), Dim("L", min=2), Dim("S", min=2)
    return [
        (
            SelfAttention(layer),
            (inputs(2, 5),),
            ({0: n, 1: length},),
            (inputs(3, 9, seed=2),),
        ),
        (
            CrossAttention(layer),
            (inputs(2, 5), inputs(2, 7, seed=1), padding(2, 7)),
            ({0: n, 1: length}, {0: n, 1: key_len}, {0: n, 1: key_len}),
            (inputs(3, 4, seed=2), inputs(3, 11, seed=3), padding(3, 11)),
        ),
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["self-causal", "cross-padding"])
def test_torch_export_with_dynamic_shapes_matches_eager(case):
    module, example, dynamic, other = exportable()[case]
    program = torch.export.export(module, example, dynamic_shapes=dynamic)
    with torch.no_grad():
        for args in (example, other):
            torch.testing.assert_close(program.module()(*args), module(*args), **TOL)


@pytest.mark.parametrize("case", [0, 1], ids=["self-causal", "cross-padding"])
def test_onnx_export_runs_in_onnxruntime(case, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    module, example, dynamic, other = exportable()[case]
    path = tmp_path / "attention.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, dynamo=True, dynamic_shapes=dynamic, verbose=False
        )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        for args in (example, other):
            (out,) = session.run(None, {k: a.numpy() for k, a in zip(names, args, strict=True)})
            torch.testing.assert_close(torch.from_numpy(out), module(*args), **TOL)
