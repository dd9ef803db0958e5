"""Integrations of :mod:`multihead`'s attention core with other libraries.

- :mod:`multihead.integrations.transformers`: a Hugging Face ``transformers`` attention
  backend (``attn_implementation="multihead"``); needs the ``hf`` extra.
"""
