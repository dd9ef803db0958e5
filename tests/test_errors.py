"""Bad input raises ValueError / TypeError naming the argument, and leaves the layer unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

import multihead

E, H = 8, 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(embed_dim=10, num_heads=3), ValueError, r"`embed_dim`.*multiple of num_heads=3.*10"),
        (dict(embed_dim=0, num_heads=1), ValueError, r"`embed_dim`.*positive integer.*embed_dim=0"),
        (dict(embed_dim=8, num_heads=-2), ValueError, r"`num_heads`.*positive.*num_heads=-2"),
        (dict(embed_dim=8.0, num_heads=2), TypeError, r"`embed_dim`.*integer.*embed_dim=8.0"),
        (dict(embed_dim=8, num_heads="2"), TypeError, r"`num_heads`.*integer.*'2'"),
        (dict(embed_dim=True, num_heads=1), TypeError, r"`embed_dim`.*embed_dim=True"),
        (dict(embed_dim=8, num_heads=2, dropout=1.5), ValueError, r"`dropout`.*\[0, 1\].*1.5"),
        (dict(embed_dim=8, num_heads=2, dropout=-0.1), ValueError, r"`dropout`.*-0.1"),
        (dict(embed_dim=8, num_heads=2, dropout="0.1"), TypeError, r"`dropout`.*'0.1'"),
        (dict(embed_dim=8, num_heads=2, kdim=0), ValueError, r"`kdim`.*positive.*kdim=0"),
        (dict(embed_dim=8, num_heads=2, vdim=2.5), TypeError, r"`vdim`.*vdim=2.5"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        multihead.MultiheadAttention(**kwargs)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


L, N, S = 3, 2, 4
GOOD = dict(query=x(L, N, E), key=x(S, N, E), value=x(S, N, E))


def call(**overrides):
    return {**GOOD, **overrides}


CASES = [
    ("non-tensor query", call(query=[[1.0]]), TypeError, r"`query`.*torch.Tensor.*list"),
    ("non-tensor value", call(value=None), TypeError, r"`value`.*torch.Tensor.*NoneType"),
    ("4-D query", call(query=x(1, L, N, E)), ValueError, r"`query`.*3-D batched.*4-D"),
    ("1-D query", call(query=x(E)), ValueError, r"`query`.*2-D unbatched.*1-D"),
    ("unbatched key", call(key=x(S, E)), ValueError, r"`key`.*3-D \(batched, as query\).*2-D"),
    (
        "batched key with unbatched query",
        call(query=x(L, E), key=x(S, N, E), value=x(S, N, E)),
        ValueError,
        r"`key`.*2-D \(unbatched, as query\).*3-D",
    ),
    ("query width", call(query=x(L, N, E + 1)), ValueError, r"`query`.*embed_dim=8.*\(3, 2, 9\)"),
    ("key width", call(key=x(S, N, 5)), ValueError, r"`key`.*kdim=8.*\(4, 2, 5\)"),
    ("value width", call(value=x(S, N, 5)), ValueError, r"`value`.*vdim=8.*\(4, 2, 5\)"),
    (
        "key/value length",
        call(value=x(S + 1, N, E)),
        ValueError,
        r"`value`.*same batch and sequence sizes as key.*\(5, 2, 8\)",
    ),
    (
        "batch mismatch",
        call(key=x(S, N + 1, E), value=x(S, N + 1, E)),
        ValueError,
        r"`key`.*batch size 2.*batch size 3",
    ),
    (
        "dtype",
        call(query=x(L, N, E, dtype=torch.float64)),
        TypeError,
        r"`query`.*dtype torch.float32.*torch.float64",
    ),
    (
        "int input",
        call(key=torch.ones(S, N, E, dtype=torch.int64)),
        TypeError,
        r"`key`.*dtype torch.float32.*torch.int64",
    ),
    (
        "key_padding_mask shape",
        call(key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool)),
        ValueError,
        r"`key_padding_mask`.*\(2, 4\) \(N, S\).*\(2, 5\)",
    ),
    (
        "key_padding_mask transposed",
        call(key_padding_mask=torch.zeros(S, N, dtype=torch.bool)),
        ValueError,
        r"`key_padding_mask`.*\(2, 4\).*\(4, 2\)",
    ),
    (
        "key_padding_mask dtype",
        call(key_padding_mask=torch.zeros(N, S, dtype=torch.int64)),
        TypeError,
        r"`key_padding_mask`.*bool.*floating-point.*torch.int64",
    ),
    (
        "key_padding_mask type",
        call(key_padding_mask=[[True] * S] * N),
        TypeError,
        r"`key_padding_mask`.*torch.Tensor or None.*list",
    ),
    (
        "attn_mask shape",
        call(attn_mask=torch.zeros(S, L, dtype=torch.bool)),
        ValueError,
        r"`attn_mask`.*\(3, 4\) \(L, S\) or \(4, 3, 4\).*\(4, 3\)",
    ),
    (
        "attn_mask 3-D shape",
        call(attn_mask=torch.zeros(N, L, S)),
        ValueError,
        r"`attn_mask`.*\(N \* num_heads, L, S\).*\(2, 3, 4\)",
    ),
    (
        "attn_mask dtype",
        call(attn_mask=torch.zeros(L, S, dtype=torch.uint8)),
        TypeError,
        r"`attn_mask`.*torch.uint8",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_forward_errors_name_the_argument_and_leave_the_layer_unchanged(kwargs, error, match):
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(E, H)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(**kwargs)
    after = layer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert layer.training
    assert all(p.grad is None for p in layer.parameters())
    out, _ = layer(**GOOD)  # still usable
    assert out.shape == (L, N, E)


def test_unbatched_masks_are_checked_against_unbatched_shapes():
    layer = multihead.MultiheadAttention(E, H)
    q, kv = x(L, E), x(S, E)
    with pytest.raises(ValueError, match=r"`key_padding_mask`.*\(4,\) \(S,\) for unbatched"):
        layer(q, kv, kv, key_padding_mask=torch.zeros(1, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`attn_mask`.*\(2, 3, 4\) \(num_heads, L, S\)"):
        layer(q, kv, kv, attn_mask=torch.zeros(1, L, S, dtype=torch.bool))


def test_batch_first_batch_dimension_is_checked():
    layer = multihead.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(ValueError, match=r"`key`.*batch size 2 \(as query\) in dim 0"):
        layer(x(N, L, E), x(N + 1, S, E), x(N + 1, S, E))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(), "in_proj_weight"),
        (dict(kdim=5), "q_proj_weight"),
        (dict(vdim=3), "v_proj_weight"),
        (dict(qk_norm=True), "k_norm.weight"),
    ],
)
@pytest.mark.parametrize("to", [torch.float16, torch.float32])
def test_a_weight_of_another_dtype_is_named(kwargs, name, to):
    """torch's layer fails inside a matmul ("self and mat2 must have the same dtype"); ours
    names the weight, before any work."""
    layer = multihead.MultiheadAttention(8, 2, dtype=torch.float64, **kwargs)
    module, _, attr = name.rpartition(".")
    owner = layer.get_submodule(module)
    setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().to(to)))
    q = torch.randn(3, 2, 8, dtype=torch.float64)
    k = torch.randn(3, 2, layer.kdim, dtype=torch.float64)
    v = torch.randn(3, 2, layer.vdim, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=rf"Invalid argument `{name}`: expected dtype torch.float64"
    ):
        layer(q, k, v)


@pytest.mark.parametrize("name", ["in_proj_bias", "out_proj.bias", "bias_k", "bias_v"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("to", [torch.float16, torch.float32])
def test_a_bias_of_another_dtype_is_added_as_torch_adds_it(name, batch_first, to):
    """torch's own test suite runs a float64 layer with a half in_proj_bias: torch's layer adds
    it in the output's dtype (float64). Ours does so in every layout (torch's only where its
    F.linear takes the matmul-then-add route), with the same numbers as the bias cast up."""
    torch.manual_seed(0)
    layer = multihead.MultiheadAttention(
        8, 2, batch_first=batch_first, add_bias_kv=True, dtype=torch.float64
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    module, _, attr = name.rpartition(".")
    owner = layer.get_submodule(module)
    low = getattr(owner, attr).detach().to(to)
    cast_up = copy.deepcopy(layer)
    setattr(cast_up.get_submodule(module), attr, torch.nn.Parameter(low.double()))
    setattr(owner, attr, torch.nn.Parameter(low))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out, weights = layer(x, x, x)
    expected, expected_weights = cast_up(x, x, x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-12)
    if name == "in_proj_bias" and batch_first:  # the case torch's layer runs
        theirs = torch.nn.MultiheadAttention(
            8, 2, batch_first=True, add_bias_kv=True, dtype=torch.float64
        )
        theirs.load_state_dict(cast_up.state_dict())
        theirs.in_proj_bias = torch.nn.Parameter(low)
        torch.testing.assert_close(out, theirs(x, x, x)[0], atol=1e-12, rtol=1e-12)
