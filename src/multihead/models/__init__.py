"""Pretrained models running on multihead.MultiheadAttention (the ``models`` extra).

- :mod:`multihead.models.bert`: a BERT encoder and Hugging Face's checkpoint layout mapped in.
- :mod:`multihead.models.minilm`: sentence-transformers' all-MiniLM-L6-v2, ``load()``.
"""
