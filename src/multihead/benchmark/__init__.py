"""Benchmarks of multihead against torch.nn.MultiheadAttention (``python -m multihead bench``)."""
