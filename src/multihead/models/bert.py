"""A BERT encoder (inference) whose every attention layer is :class:`multihead.MultiheadAttention`.

Shape legend: N batch, T tokens, E hidden size, H heads, F feed-forward size.

The embeddings, layer norms and feed-forward blocks are plain torch; the post-norm layout and
the exact (erf) GELU are BERT's. There is no dropout: the encoder serves pretrained weights.
Hugging Face's checkpoint layout maps in with :func:`from_hf_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import MultiheadAttention


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, named as in Hugging Face's ``config.json``."""

    vocab_size: int
    hidden_size: int  # E
    num_hidden_layers: int
    num_attention_heads: int  # H
    intermediate_size: int  # F
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """Reads the fields above from a Hugging Face BERT ``config.json`` dict.

        Raises:
            ValueError: the config is not a BERT with absolute positions and GELU.
        """
        kind = (config.get("model_type"), config.get("position_embedding_type", "absolute"))
        if kind != ("bert", "absolute") or config.get("hidden_act") != "gelu":
            raise ValueError(
                "Invalid argument `config`: expected a BERT config with absolute positions and "
                f"hidden_act='gelu'. Received: model_type={config.get('model_type')!r}, "
                f"position_embedding_type={kind[1]!r}, hidden_act={config.get('hidden_act')!r}."
            )
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type (segment) embeddings, then a layer norm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        """``(N, T)`` token ids (one segment, type 0) -> ``(N, T, E)``."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(x)


class BertLayer(nn.Module):
    """Post-norm transformer layer: x = norm(x + attention(x)); x = norm(x + ffn(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        e = config.hidden_size
        self.attention = MultiheadAttention(e, config.num_attention_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(e, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, e)
        self.output_norm = nn.LayerNorm(e, eps=config.layer_norm_eps)

    def forward(
        self, x: Tensor, padding: Tensor | None, *, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x ``(N, T, E)``, padding ``(N, T)`` bool (True = padding) -> x, weights
        ``(N, H, T, T)`` per head when ``need_weights``, else None."""
        attended, weights = self.attention(
            x,
            x,
            x,
            key_padding_mask=padding,
            need_weights=need_weights,
            average_attn_weights=False,
        )
        x = self.attention_norm(x + attended)
        x = self.output_norm(x + self.output(F.gelu(self.intermediate(x))))
        return x, weights


class BertEncoder(nn.Module):
    """Embeddings and a stack of :class:`BertLayer`; returns the last hidden states."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, input_ids: Tensor, padding: Tensor | None = None, *, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Encodes a batch of token ids.

        Args:
            input_ids: ``(N, T)`` token ids.
            padding: ``(N, T)`` bool, True on padding tokens (the attention's
                ``key_padding_mask``), or None when no sequence is padded.
            need_weights: also return every layer's per-head attention weights.

        Returns:
            ``(hidden, weights)``: hidden ``(N, T, E)``; weights ``(layers, N, H, T, T)`` when
            ``need_weights``, else None.
        """
        x = self.embeddings(input_ids)  # (N, T, E)
        maps = []
        for layer in self.layers:
            x, weights = layer(x, padding, need_weights=need_weights)
            maps.append(weights)
        return x, torch.stack(maps) if need_weights else None


# Hugging Face BertModel names -> ours, for everything outside the attention projections.
_RENAMES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "attention.output.dense": "attention.out_proj",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
# Not part of the encoder: the position-id buffer and the unused [CLS] pooler head.
_UNUSED = ("embeddings.position_ids", "pooler.")


def from_hf_state_dict(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face ``BertModel`` state dict in :class:`BertEncoder`'s names.

    The separate query / key / value projections are stacked in that order into the
    attention's ``in_proj_weight (3E, E)`` and ``in_proj_bias (3E,)``, the layout of
    ``torch.nn.MultiheadAttention``; ``attention.output.dense`` becomes ``out_proj``.
    """
    ours: dict[str, Tensor] = {}
    projections: dict[str, dict[str, Tensor]] = {}
    for name, tensor in hf.items():
        name = name.removeprefix("bert.")  # BertFor* checkpoints nest the encoder
        if name.startswith(_UNUSED):
            continue
        name = name.removeprefix("encoder.layer.")
        if not name.startswith("embeddings."):
            name = f"layers.{name}"
        if ".attention.self." in name:
            # layers.{i}.attention.self.{query,key,value}.{weight,bias}
            head, _, tail = name.partition(".attention.self.")
            which, _, kind = tail.partition(".")
            projections.setdefault(f"{head}.attention.in_proj_{kind}", {})[which] = tensor
            continue
        for old, new in _RENAMES.items():
            if f".{old}." in f".{name}":
                name = name.replace(old, new, 1)
                break
        ours[name] = tensor
    for name, parts in projections.items():
        ours[name] = torch.cat([parts["query"], parts["key"], parts["value"]])  # (3E, ...)
    return ours
