"""The Triton Python-backend model for every catalog entry: our own runtime code inside Triton.

The generated `model.py` of each model in the Triton repository only re-exports
`TritonPythonModel` from here, so a catalog model runs the same `Runtime` on both backends.
Triton's dynamic batcher hands `execute()` a list of requests: they are padded and stacked into
one batch, run once, and split back into one response (or error) per request.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from services.inference.runtime import (
    RuntimeOptions,
    load_runtime,
    pad_and_stack,
    set_torch_threads,
    token_embeddings_output,
)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Before loading, Triton lets the model complete its config: a runtime's optional outputs
        (a sentence embedder's `token_embeddings`) join the catalog's outputs, as the embedded
        repository adds them, so clients may ask for them by name. Only where Triton runs with
        auto-complete on (deploy/'s repository): `meshserve up` writes them into the config itself
        and turns it off (triton_launcher.complete)."""
        config = auto_complete_model_config.as_dict()
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if "MESHSERVE_MODEL_DIR" not in params:
            return auto_complete_model_config
        extra = token_embeddings_output(
            params.get("MESHSERVE_RUNTIME", ""),
            params.get("MESHSERVE_ENGINE", "torch"),
            Path(params["MESHSERVE_MODEL_DIR"]),
        )
        if extra and extra["name"] not in {o["name"] for o in config.get("output", [])}:
            auto_complete_model_config.add_output(
                {"name": extra["name"], "data_type": f"TYPE_{extra['datatype']}", "dims": list(extra["dims"])}
            )
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        set_torch_threads(int(params.get("TORCH_THREADS", "1")), import_torch=True)
        self.generation = None
        if params["MESHSERVE_RUNTIME"] == "causal_lm":
            self.generation = _GenerationHost(params)
            return
        options = RuntimeOptions(
            engine=params.get("MESHSERVE_ENGINE", "torch"),
            threads=int(params.get("TORCH_THREADS", "1")),
            cache_dir=Path(params["MESHSERVE_ENGINE_CACHE"]) if "MESHSERVE_ENGINE_CACHE" in params else None,
            chunk_rows=int(params.get("MESHSERVE_CHUNK_ROWS", "0")),
        )
        self.runtime = load_runtime(params["MESHSERVE_RUNTIME"], Path(params["MESHSERVE_MODEL_DIR"]), options)
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        if self.generation is not None:  # decoupled: responses go through each request's sender
            for request in requests:
                self.generation.start(request, pb_utils)
            return None

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
        valid = [(a, r) for a, r, e in zip(arrays, requests, errors, strict=True) if e is None]
        good = iter(self._run([a for a, _ in valid], [self._wanted(r) for _, r in valid], pb_utils))
        return [
            next(good) if e is None else pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(e))
            for e in errors
        ]

    def _wanted(self, request) -> list[str]:
        """The outputs a request asked for (Triton lists every output when it asked for none), in the
        config's order: Triton hands the names over as a set, whose order differs between the
        processes of a model's instances, and a client may compare two answers' `outputs` lists."""
        asked = set(request.requested_output_names())
        return [name for name in self.outputs if name in asked] or self.outputs

    def _run(self, arrays: list[dict], wanted: list[list[str]], pb_utils) -> list:
        """One padded batch for the valid requests, computing the outputs some request asked for
        (the pooled path never builds token embeddings it would drop); one response each."""
        if not arrays:
            return []
        rows = [a[self.inputs[0]].shape[0] for a in arrays]
        try:
            stacked = {
                name: pad_and_stack([a[name] for a in arrays], self.runtime.pad_values.get(name, 0))
                for name in self.inputs
            }
            outputs = self.runtime.execute_outputs(stacked, frozenset(n for names in wanted for n in names))
        except Exception as exc:  # every request of the batch gets the error, the model stays up
            error = pb_utils.TritonError(f"model execution failed: {type(exc).__name__}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in arrays]
        responses, offset = [], 0
        for a, n, names in zip(arrays, rows, wanted, strict=True):
            own = self.runtime.request_outputs({name: outputs[name][offset : offset + n] for name in names}, a)
            # contiguous: pb_utils.Tensor copies the array's memory as it lies
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(own[name])) for name in names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += n
        return responses

    def finalize(self) -> None:
        if self.generation is not None:
            self.generation.close()
        self.runtime = None
        # The stub answers Triton and ends once this returns. Tearing its interpreter down (torch's
        # and transformers' modules) then took ~1 s of CPU per stub while the model stayed
        # UNLOADING, and a model's instances unload one after the other; nothing is left to release.
        atexit.register(_exit_now)


def _exit_now() -> None:
    """The first exit handler to run at the stub's interpreter shutdown: flush, then end the
    process without the rest of the teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class _GenerationHost:
    """Our GenerationScheduler on an asyncio loop in a thread of the Python stub process; each
    Triton request becomes a sequence whose tokens are sent through the request's response sender
    as they come, then the final flag. A request Triton reports cancelled leaves the batch."""

    def __init__(self, params: dict) -> None:
        import asyncio
        import threading

        from services.common.catalog import InferenceSpec, TensorSpec
        from services.common.generation_contract import InputTensor, OutputTensor
        from services.inference.generation import CausalLMRuntime, GenerationScheduler

        runtime = CausalLMRuntime(Path(params["MESHSERVE_MODEL_DIR"]))
        spec = InferenceSpec(
            name="generation",
            runtime="causal_lm",
            inputs=(TensorSpec(name=InputTensor.INPUT_IDS, datatype=InputTensor.INPUT_IDS.datatype, dims=(-1,)),),
            outputs=(TensorSpec(name=OutputTensor.TOKEN_ID, datatype=OutputTensor.TOKEN_ID.datatype, dims=(1,)),),
            max_batch_size=int(params.get("MAX_RUNNING", "32")),
            max_queue_size=int(params.get("MAX_WAITING", "256")),
        )
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="meshserve-generation", daemon=True).start()

        async def make():
            return GenerationScheduler("generation", runtime, spec)

        self.scheduler = asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def start(self, request, pb_utils) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._serve(request, pb_utils), self.loop)

    async def _serve(self, request, pb_utils) -> None:
        import numpy as np

        from services.common.errors import MeshError
        from services.common.generation_contract import InputTensor, OutputTensor
        from services.inference.core import sampling_from_json

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            ids = (
                pb_utils.get_input_tensor_by_name(request, InputTensor.INPUT_IDS.value).as_numpy().reshape(-1).tolist()
            )
            stop = pb_utils.get_input_tensor_by_name(request, InputTensor.STOP_TOKEN_IDS.value)
            params = sampling_from_json(request.parameters(), stop.as_numpy().reshape(-1).tolist() if stop else [])
            stream = self.scheduler.submit(ids, params)
        except (MeshError, ValueError) as exc:
            message = exc.message if isinstance(exc, MeshError) else str(exc)
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)), flags=final)
            return

        def fail(message: str) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)), flags=final)

        try:
            async for event in stream:
                if sender.is_cancelled():
                    stream.cancel()  # it leaves at the next step; its final event ends this loop
                    continue
                if event.final:
                    if event.error:  # a failed step: an error, not a normal end the gateway would count
                        fail(event.error)
                    else:
                        sender.send(flags=final)
                    return
                if event.prompt_logprobs is not None:  # the prompt's scores, before its first token
                    scores = np.array(event.prompt_logprobs, dtype=np.float32)
                    tensors = [pb_utils.Tensor(OutputTensor.PROMPT_LOGPROBS.value, scores)]
                else:
                    tensors = [
                        pb_utils.Tensor(OutputTensor.TOKEN_ID.value, np.array([event.token_id], dtype=np.int64)),
                        pb_utils.Tensor(OutputTensor.LOGPROB.value, np.array([event.logprob], dtype=np.float32)),
                    ]
                    if event.top:  # top_logprobs asked for: INT64 [1, k] and FP32 [1, k]
                        ids, scores = zip(*event.top, strict=True)
                        tensors.append(pb_utils.Tensor(OutputTensor.TOP_TOKEN_IDS.value, np.array([ids], np.int64)))
                        tensors.append(pb_utils.Tensor(OutputTensor.TOP_LOGPROBS.value, np.array([scores], np.float32)))
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
        except Exception as exc:  # this coroutine's future is not awaited: end the stream here, or it hangs
            stream.cancel()
            fail(f"generation failed: {type(exc).__name__}")

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.scheduler.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
