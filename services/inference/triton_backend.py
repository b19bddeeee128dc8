"""The Triton Python-backend model for every catalog entry: our own runtime code inside Triton.

The generated `model.py` of each model in the Triton repository only re-exports
`TritonPythonModel` from here, so a catalog model runs the same `Runtime` on both backends.
Triton's dynamic batcher hands `execute()` a list of requests: they are padded and stacked into
one batch, run once, and split back into one response (or error) per request.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.inference.runtime import load_runtime, pad_and_stack, set_torch_threads


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        set_torch_threads(int(params.get("TORCH_THREADS", "1")))
        self.runtime = load_runtime(params["MESHSERVE_RUNTIME"], Path(params["MESHSERVE_MODEL_DIR"]))
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        arrays = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs} for r in requests
        ]
        # One bad request gets its own error; the others still run together as one batch.
        errors: list[str | None] = []
        for a in arrays:
            try:
                self.runtime.validate(a)
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        good = iter(self._run([a for a, e in zip(arrays, errors, strict=True) if e is None], pb_utils))
        return [
            next(good) if e is None else pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(e))
            for e in errors
        ]

    def _run(self, arrays: list[dict], pb_utils) -> list:
        """One padded batch for the valid requests; one response each."""
        if not arrays:
            return []
        rows = [a[self.inputs[0]].shape[0] for a in arrays]
        try:
            stacked = {
                name: pad_and_stack([a[name] for a in arrays], self.runtime.pad_values.get(name, 0))
                for name in self.inputs
            }
            outputs = self.runtime.execute(stacked)
        except Exception as exc:  # every request of the batch gets the error, the model stays up
            error = pb_utils.TritonError(f"model execution failed: {type(exc).__name__}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in arrays]
        responses, offset = [], 0
        for n in rows:
            tensors = [pb_utils.Tensor(name, outputs[name][offset : offset + n]) for name in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += n
        return responses

    def finalize(self) -> None:
        self.runtime = None
