"""multihead.swap / from_torch / to_torch: whole torch models before and after the swap.

Every model is built in float64 with dropout 0 and compared, before and after the swap, in
train mode (our forward runs) and in eval mode: with autograd on (our forward runs), under
no_grad with torch's encoder-layer fast path (torch's fused kernel runs on our parameters) and
under no_grad with the fast path turned off (our forward runs).
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import multihead

DTYPE = torch.float64
E, H, FF = 16, 4, 32
TOL = dict(atol=1e-10, rtol=0)

# torch warns that its stack's nested-tensor path needs batch_first (the tests use both
# layouts), and that its nested tensors are a prototype.
pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]


class ViT(nn.Module):
    """A small pre-norm vision transformer: patches, a class token, learnt positions."""

    def __init__(self, image: int = 8, patch: int = 4, classes: int = 3, depth: int = 2) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, E, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, E))
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)  # (N, P, E)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (N, P + 1, E)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # (N, classes)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.norm2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, FF), nn.GELU(), nn.Linear(FF, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def seq(n: int, length: int, batch_first: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, length, E) if batch_first else (length, n, E)
    return torch.randn(shape, generator=gen, dtype=DTYPE)


PADDING = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])  # (N, S), left aligned


def transformer(batch_first: bool):
    model = nn.Transformer(E, H, 2, 2, FF, dropout=0.0, batch_first=batch_first)
    src, tgt = seq(2, 6, batch_first, 1), seq(2, 5, batch_first, 2)
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE),
        src_key_padding_mask=PADDING,
        memory_key_padding_mask=PADDING,
    )
    return model, (src, tgt), kwargs, 6


def encoder(batch_first: bool):
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model, (seq(2, 6, batch_first, 3),), dict(src_key_padding_mask=PADDING), 2


def nested_encoder(batch_first: bool):
    """The stack's own fast path: a padded batch becomes a nested tensor for every layer."""
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    return model, (seq(2, 6, batch_first, 4),), dict(src_key_padding_mask=PADDING), 2


def decoder(batch_first: bool):
    layer = nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerDecoder(layer, 2)
    tgt, memory = seq(2, 5, batch_first, 5), seq(2, 6, batch_first, 6)
    kwargs = dict(tgt_is_causal=True, memory_key_padding_mask=PADDING)
    kwargs["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE)
    return model, (tgt, memory), kwargs, 4


def vit(batch_first: bool):
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    return ViT(), (images,), {}, 2


MODELS = [transformer, encoder, nested_encoder, decoder, vit]


def build(make, batch_first: bool):
    torch.manual_seed(0)
    model, inputs, kwargs, count = make(batch_first)
    model = model.to(DTYPE)
    ours = copy.deepcopy(model)
    assert multihead.swap(ours) == count
    assert not any(type(m) is nn.MultiheadAttention for m in ours.modules())
    assert sum(isinstance(m, multihead.MultiheadAttention) for m in ours.modules()) == count
    return model, ours, inputs, kwargs


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("make", MODELS)
def test_train_mode_outputs_and_gradients_match(make, batch_first):
    theirs, ours, inputs, kwargs = build(make, batch_first)
    theirs.train(), ours.train()
    expected, out = theirs(*inputs, **kwargs), ours(*inputs, **kwargs)
    torch.testing.assert_close(out, expected, **TOL)
    expected.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("make", MODELS)
def test_eval_mode_with_autograd_matches(make, batch_first):
    theirs, ours, inputs, kwargs = build(make, batch_first)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(*inputs, **kwargs), theirs(*inputs, **kwargs), **TOL)


@contextlib.contextmanager
def fast_path(enabled: bool):
    """torch.backends.mha.set_fastpath_enabled for a block (it is a setter, not a context)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def count_calls(monkeypatch):
    """Counts torch's fused encoder-layer kernel and our layer's forward."""
    calls = {"fused": 0, "ours": 0}
    fused, forward = torch._transformer_encoder_layer_fwd, multihead.MultiheadAttention.forward

    def counted_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        calls["ours"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted_fused)
    monkeypatch.setattr(multihead.MultiheadAttention, "forward", counted_forward)
    yield calls


@pytest.mark.parametrize("make", [encoder, nested_encoder, transformer])
def test_eval_fast_path_disabled_runs_our_layer(make, monkeypatch):
    theirs, ours, inputs, kwargs = build(make, batch_first=True)
    theirs.eval(), ours.eval()
    with torch.no_grad(), fast_path(False):
        expected = theirs(*inputs, **kwargs)
        with count_calls(monkeypatch) as calls:
            out = ours(*inputs, **kwargs)
    torch.testing.assert_close(out, expected, **TOL)
    assert calls == {"fused": 0, "ours": 6 if make is transformer else 2}


@pytest.mark.parametrize("make", [encoder, nested_encoder, transformer])
def test_eval_fast_path_declines_our_layers(make, monkeypatch):
    """With torch's fast path on, its fused encoder kernel declines our layers (their
    no-op forward pre-hook says so): every attention runs our forward, once per layer call
    (a nested batch included), and the model agrees with the unswapped one, whose encoder runs
    torch's fused kernel, to the tolerance (different kernels: never bitwise)."""
    theirs, ours, inputs, kwargs = build(make, batch_first=True)
    theirs.eval(), ours.eval()
    with torch.no_grad(), fast_path(True):
        with count_calls(monkeypatch) as their_calls:
            expected = theirs(*inputs, **kwargs)
        assert their_calls["fused"] == 2  # torch's own layers do take the fused kernel
        with count_calls(monkeypatch) as calls:
            out = ours(*inputs, **kwargs)
    assert calls == {"fused": 0, "ours": 6 if make is transformer else 2}
    torch.testing.assert_close(out, expected, **TOL)


OPTIONS = [
    {},
    dict(bias=False),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=3, vdim=5),
    dict(batch_first=True, dropout=0.25),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_from_torch_and_back_keep_options_parameters_and_numbers(options):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, dtype=DTYPE, **options).eval()
    rng = torch.random.get_rng_state()
    ours = multihead.from_torch(theirs)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not ours.training
    for name in ("embed_dim", "num_heads", "dropout", "kdim", "vdim", "batch_first"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._qkv_same_embed_dim == theirs._qkv_same_embed_dim
    ours_state, their_state = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
    assert list(ours_state) == list(their_state)
    assert all(ours_state[k] is their_state[k] for k in their_state)  # moved, not copied
    # Built on the meta device: nothing of ours (a buffer, say) may be left there.
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])

    first = 1 if options.get("batch_first") else 0
    shape = [6, 6]
    shape.insert(first, 2)
    query = torch.randn([*shape[:2], E], dtype=DTYPE)
    key = torch.randn([*shape[:2], options.get("kdim", E)], dtype=DTYPE)
    value = torch.randn([*shape[:2], options.get("vdim", E)], dtype=DTYPE)
    for a, b in zip(ours(query, key, value), theirs(query, key, value), strict=True):
        torch.testing.assert_close(a, b, **TOL)

    back = multihead.to_torch(ours.train())
    assert type(back) is nn.MultiheadAttention and back.training
    assert all(back.state_dict(keep_vars=True)[k] is v for k, v in their_state.items())
    assert (back.bias_k is None) == (theirs.bias_k is None)
    assert back.add_zero_attn == theirs.add_zero_attn


def test_swap_keeps_parameters_optimizer_device_and_dtype():
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, H, FF, dropout=0.0))
    model = model.to(torch.float16)
    before = list(model.parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert multihead.swap(model) == 1
    attn = model[1].self_attn
    assert isinstance(attn, multihead.MultiheadAttention)
    assert attn.in_proj_weight.dtype == torch.float16 and attn.in_proj_weight.device.type == "cpu"
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), before, strict=True))
    # The optimizer built before the swap still steps the swapped layer.
    x = torch.randn(4, 2, E, dtype=torch.float16)
    model(x).float().square().sum().backward()
    weight = attn.in_proj_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(attn.in_proj_weight, weight)


def test_swap_on_meta_device_stays_on_meta():
    model = nn.TransformerDecoderLayer(E, H, FF, device="meta")
    assert multihead.swap(model) == 2
    assert all(p.is_meta for p in model.parameters())


def test_swap_replaces_a_shared_layer_once_under_every_name():
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    assert multihead.swap(model) == 1
    assert model["a"] is model["b"][0]
    assert isinstance(model["a"], multihead.MultiheadAttention)


def test_swap_leaves_models_without_attention_and_subclasses_alone():
    plain = nn.Sequential(nn.Linear(2, 2))
    assert multihead.swap(plain) == 0

    class Custom(nn.MultiheadAttention):
        pass

    model = nn.Sequential(Custom(E, H))
    assert multihead.swap(model) == 0
    assert type(model[0]) is Custom


def test_swap_rejects_a_bare_layer():
    with pytest.raises(TypeError, match=r"Invalid argument `model`.*multihead.from_torch"):
        multihead.swap(nn.MultiheadAttention(E, H))


def test_swap_replaces_a_layer_in_a_shared_container():
    block = nn.Sequential(nn.MultiheadAttention(E, H))
    model = nn.ModuleDict({"a": block, "b": block})
    assert multihead.swap(model) == 1
    assert model["a"] is model["b"]
    assert isinstance(block[0], multihead.MultiheadAttention)


@settings(max_examples=10)
@given(data=st.data())
def test_swap_is_all_or_nothing(data):
    """torch's layer takes dropout=1.5 (its constructor does not check; forward would fail),
    ours asks for [0, 1]: a later layer that cannot be converted leaves every module, the ones
    converted before it included, where it was."""
    depth = data.draw(st.integers(2, 4), label="depth")
    refused = data.draw(st.integers(1, depth - 1), label="refused layer")
    model = nn.Sequential(
        *(nn.TransformerDecoderLayer(E, H, FF, dropout=0.0) for _ in range(depth))
    )
    model[refused].multihead_attn = nn.MultiheadAttention(E, H, dropout=1.5)
    modules = dict(model.named_modules(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    with pytest.raises(
        ValueError,
        match=r"Invalid argument `dropout`: expected a float in \[0, 1\]. Received: dropout=1.5.",
    ):
        multihead.swap(model)
    after = dict(model.named_modules(remove_duplicate=False))
    assert list(after) == list(modules)
    assert all(after[path] is module for path, module in modules.items())
    assert sum(type(m) is nn.MultiheadAttention for m in model.modules()) == 2 * depth
    assert all(v is state[k] for k, v in model.state_dict(keep_vars=True).items())


@pytest.mark.parametrize(
    ("model", "received"),
    [
        (None, "a builtins.NoneType"),
        ([nn.MultiheadAttention(E, H)], "a builtins.list"),
        (nn.MultiheadAttention(E, H).state_dict(), "a collections.OrderedDict"),
    ],
)
def test_swap_rejects_what_is_not_a_module(model, received):
    with pytest.raises(
        TypeError,
        match=rf"Invalid argument `model`: expected a torch.nn.Module. Received: {received}.",
    ):
        multihead.swap(model)


# Options beyond torch's, where our constructor has them, with a value torch cannot express.
BEYOND_TORCH = dict(num_kv_heads=2, rope=True, window=3, qk_norm=True, softcap=30.0)


@pytest.mark.parametrize("name", sorted(BEYOND_TORCH))
def test_to_torch_rejects_options_torch_lacks(name):
    if name not in inspect.signature(multihead.MultiheadAttention.__init__).parameters:
        pytest.skip(f"multihead.MultiheadAttention has no `{name}` option")
    layer = multihead.MultiheadAttention(E, H, **{name: BEYOND_TORCH[name]})
    with pytest.raises(ValueError, match=rf"Invalid argument `layer`: .*Received: {name}="):
        multihead.to_torch(layer)


def test_conversions_reject_the_wrong_class():
    with pytest.raises(
        TypeError,
        match=r"Invalid argument `layer`: expected a torch.nn.MultiheadAttention. "
        r"Received: a multihead.layer.MultiheadAttention.",
    ):
        multihead.from_torch(multihead.MultiheadAttention(E, H))
    with pytest.raises(
        TypeError,
        match=r"Invalid argument `layer`: expected a multihead.MultiheadAttention. "
        r"Received: a torch.nn.modules.activation.MultiheadAttention.",
    ):
        multihead.to_torch(nn.MultiheadAttention(E, H))


@settings(max_examples=20)
@given(rope_base=st.floats(1.0, 1e6), window=st.integers(1, 10**6))
def test_to_torch_accepts_a_layer_that_computes_what_torchs_computes(rope_base, window):
    """rope_base changes nothing while rope is off: such a layer converts, and torch's layer
    then gives the same numbers."""
    layer = multihead.MultiheadAttention(E, H, rope_base=rope_base, dtype=torch.float64)
    assert layer.is_torch_compatible and layer.options_beyond_torch() == {}
    back = multihead.to_torch(layer)
    x = torch.randn(3, 2, E, dtype=torch.float64)
    torch.testing.assert_close(back(x, x, x)[0], layer(x, x, x)[0], **TOL)
    windowed = multihead.MultiheadAttention(E, H, window=window)
    assert windowed.options_beyond_torch() == {"window": window}
