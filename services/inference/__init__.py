"""Inference service: the KServe v2 / Triton gRPC protocol over an embedded torch runtime with
dynamic batching (and, for the Triton backend, the launcher and model-repository generator)."""
