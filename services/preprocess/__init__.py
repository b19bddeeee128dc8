"""Preprocess service: raw task inputs -> model input tensors (tokenization, limits, counts)."""
