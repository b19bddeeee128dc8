"""Postprocess service: model output tensors -> typed task results."""
