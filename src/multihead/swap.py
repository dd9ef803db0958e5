"""Swapping torch's attention for ours inside existing models, and back.

Conversion moves the parameter objects themselves: no tensor is copied or redrawn, so the
weights, device, dtype, ``requires_grad``, weight tying and an optimizer that already holds the
parameters all carry over, and the global random generator is left where it was.

torch's ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) has an inference fast
path that never calls its attention's ``forward``; our layers decline it (see
:func:`multihead.layer._declines_fused_encoder_kernel`), so after :func:`swap` our forward runs
everywhere.
"""

from __future__ import annotations

from torch import nn

from .layer import MultiheadAttention
from .validation import invalid


def _qualified(obj: object) -> str:
    """``module.Class``: both layer classes are called MultiheadAttention."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _options(layer: nn.Module) -> dict:
    """The constructor options of a torch-compatible layer, read back from its attributes."""
    return dict(
        embed_dim=layer.embed_dim,
        num_heads=layer.num_heads,
        dropout=layer.dropout,
        bias=layer.in_proj_bias is not None,
        add_bias_kv=layer.bias_k is not None,
        add_zero_attn=layer.add_zero_attn,
        kdim=layer.kdim,
        vdim=layer.vdim,
        batch_first=layer.batch_first,
        dtype=layer.out_proj.weight.dtype,
    )


def _move_parameters(source: nn.Module, target: nn.Module) -> nn.Module:
    """Hands ``source``'s parameter objects to ``target`` (built on the meta device), strictly:
    every key must match. Returns ``target`` in ``source``'s train/eval mode.

    ``assign=True`` gives each moved Parameter the ``requires_grad`` of the target's (meta)
    placeholder, in place, so a frozen parameter would silently become trainable, in the source
    model too; each parameter's own flag is put back.

    Raises:
        ValueError: the state cannot move as it is (a pruned or weight-normed projection, an
            extra buffer); nothing has changed then.
    """
    state = source.state_dict(keep_vars=True)
    flags = {name: t.requires_grad for name, t in state.items()}
    try:
        target.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            invalid(
                "layer",
                "a layer whose state_dict holds exactly its own parameters (no pruning or "
                "weight-norm reparametrisation, no extra buffers)",
                str(error).strip().splitlines()[-1].strip(),
            )
        ) from error
    finally:  # a refused load has already flipped some flags on the source's own tensors
        for name, tensor in state.items():
            tensor.requires_grad_(flags[name])
    return target.train(source.training)


def from_torch(layer: nn.MultiheadAttention) -> MultiheadAttention:
    """Our layer with the options and the very parameters of torch's ``layer``.

    Args:
        layer: a ``torch.nn.MultiheadAttention``.

    Returns:
        A :class:`multihead.MultiheadAttention` holding ``layer``'s parameter objects (shared,
        not copied), in ``layer``'s train/eval mode. Hooks on ``layer`` are not carried over.

    Raises:
        TypeError: ``layer`` is not a ``torch.nn.MultiheadAttention``.
    """
    if not isinstance(layer, nn.MultiheadAttention):
        raise TypeError(invalid("layer", "a torch.nn.MultiheadAttention", f"a {_qualified(layer)}"))
    return _move_parameters(layer, MultiheadAttention(**_options(layer), device="meta"))


def to_torch(layer: MultiheadAttention) -> nn.MultiheadAttention:
    """torch's layer with the options and the very parameters of our ``layer``.

    Args:
        layer: a :class:`multihead.MultiheadAttention` that uses only torch's options.

    Returns:
        A ``torch.nn.MultiheadAttention`` holding ``layer``'s parameter objects (shared, not
        copied), in ``layer``'s train/eval mode.

    Raises:
        TypeError: ``layer`` is not a :class:`multihead.MultiheadAttention`.
        ValueError: ``layer`` uses an option torch's layer does not have and that changes the
            math (see :meth:`multihead.MultiheadAttention.options_beyond_torch`);
            ``rope_base`` without ``rope`` is accepted.
    """
    if not isinstance(layer, MultiheadAttention):
        raise TypeError(
            invalid("layer", "a multihead.MultiheadAttention", f"a {_qualified(layer)}")
        )
    beyond = layer.options_beyond_torch()
    if beyond:
        name, value = next(iter(beyond.items()))
        raise ValueError(
            invalid(
                "layer",
                "a layer that computes what torch.nn.MultiheadAttention computes (no option "
                "beyond torch's that changes the math)",
                f"{name}={value!r}",
            )
        )
    options = _options(layer)
    return _move_parameters(layer, nn.MultiheadAttention(**options, device="meta"))


def swap(model: nn.Module) -> int:
    """Replaces, in place, every ``torch.nn.MultiheadAttention`` inside ``model`` with ours.

    Each replacement holds the replaced layer's parameter objects (see :func:`from_torch`), so
    outputs, checkpoints (``state_dict`` keys and values) and optimizers are unchanged. A layer
    reachable under several names stays one shared layer. Subclasses of torch's layer (such as
    ``torch.ao.nn.quantizable.MultiheadAttention``, which has other parameters) are left alone.
    All or nothing: every layer is converted before any is replaced, so when one cannot be
    converted ``model`` is left exactly as it was.

    Args:
        model: any module; it is changed in place.

    Returns:
        How many distinct layers were replaced (0 when there were none).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or is itself a
            ``torch.nn.MultiheadAttention`` (it cannot be replaced in place; use
            :func:`from_torch`).
        ValueError: a layer has a setting our constructor refuses (torch's accepts
            ``dropout=1.5``, ours asks for [0, 1]); nothing was replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(invalid("model", "a torch.nn.Module", f"a {_qualified(model)}"))
    if type(model) is nn.MultiheadAttention:
        raise TypeError(
            invalid(
                "model",
                "a module that contains torch.nn.MultiheadAttention layers "
                "(convert a single layer with multihead.from_torch)",
                "a torch.nn.MultiheadAttention",
            )
        )
    # Every (parent, name) slot, shared layers and shared parents included, so that no name
    # keeps pointing at torch's layer.
    slots = []
    for path, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.MultiheadAttention:
            parent_path, _, name = path.rpartition(".")
            slots.append((model.get_submodule(parent_path), name, module))
    # Convert first (from_torch leaves its input untouched), replace only once all succeeded.
    replacements: dict[int, MultiheadAttention] = {}
    for _, _, old in slots:
        if id(old) not in replacements:
            replacements[id(old)] = from_torch(old)
    for parent, name, old in slots:
        setattr(parent, name, replacements[id(old)])
    return len(replacements)
