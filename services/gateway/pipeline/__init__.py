"""Calls to preprocess -> inference -> postprocess, the request coalescer and the response cache."""
