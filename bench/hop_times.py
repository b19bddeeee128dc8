"""Wall time of each hop of one request at c=1 (issue #18's per-hop table, bench/README.md).

Starts a mesh (tests.helpers.start_mesh, embedded backend) and, in interleaved rounds, one request
at a time: the full request over HTTP (`POST /v1/embeddings` one sentence, or the HF text
classification route with `X-Use-Cache: false`), then the same request's three stage RPCs sent
directly with the real stubs (preprocess.Preprocess, KServe ModelInfer, postprocess.Postprocess),
and an empty gRPC call (health Check) to each stage. The gateway's own part is the HTTP time minus
the three RPCs. CPU per request of each service comes from psutil over the HTTP-only phase.

    python -m bench.hop_times --rounds 300            # ~1 minute after the mesh is up
    python -m bench.hop_times --task classification
    python -m bench.hop_times --url http://127.0.0.1:8080 --ports pre=50051,inference=8001,post=50052 \
        --token "$MESHSERVE_SERVICE_TOKEN"            # a mesh that is already running

Numbers only; nothing is asserted or written to bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from meshserve.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.common import SERVICES, cpu_per_request, cpu_sample
from services.common import service_auth
from services.common.tasks import task_to_pb

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
TASKS = {
    "embeddings": ("sentence-transformers/all-MiniLM-L6-v2", "feature-extraction", "all-MiniLM-L6-v2"),
    "classification": ("meshserve/sentiment-minilm", "text-classification", None),
}


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


class Stages:
    """The three stages' stubs on their own channels, with the service token on every call."""

    def __init__(self, ports: dict[str, int], token: str | None) -> None:
        self.metadata = service_auth.metadata(token)
        self.channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
        self.pre = preprocess_pb2_grpc.PreprocessServiceStub(self.channels["pre"])
        self.inference = service_pb2_grpc.GRPCInferenceServiceStub(self.channels["inference"])
        self.post = postprocess_pb2_grpc.PostprocessServiceStub(self.channels["post"])
        self.health = {name: health_pb2_grpc.HealthStub(ch) for name, ch in self.channels.items()}

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels.values()))


async def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    reply = await call
    return time.perf_counter() - started, reply


async def stage_round(stages: Stages, model_id: str, task: str, model_name: str, samples: dict) -> None:
    """One request's three RPCs in order, each timed, then an empty call to each stage."""
    task_pb = task_to_pb(task)
    inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=[SENTENCE]))
    md = stages.metadata
    dt, pre = await timed(
        stages.pre.Preprocess(
            preprocess_pb2.PreprocessRequest(model_id=model_id, task=task_pb, inputs=inputs), metadata=md
        )
    )
    samples["preprocess RPC"].append(dt)
    request = service_pb2.ModelInferRequest(model_name=model_name)
    for t in pre.tensors:
        request.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        request.raw_input_contents.append(t.raw)
    dt, reply = await timed(stages.inference.ModelInfer(request, metadata=md))
    samples["inference RPC"].append(dt)
    outputs = [
        tasks_pb2.Tensor(name=o.name, datatype=o.datatype, shape=list(o.shape), raw=reply.raw_output_contents[i])
        for i, o in enumerate(reply.outputs)
    ]
    post = postprocess_pb2.PostprocessRequest(
        model_id=model_id, task=task_pb, outputs=outputs, side_tensors=pre.side_tensors
    )
    dt, _ = await timed(stages.post.Postprocess(post, metadata=md))
    samples["postprocess RPC"].append(dt)
    for name, stub in stages.health.items():
        dt, _ = await timed(stub.Check(health_pb2.HealthCheckRequest(service="")))
        samples[f"empty RPC ({name})"].append(dt)


def http_call(session, url: str, task: str, model_id: str):
    if task == "feature-extraction":
        return session.post(url + "/v1/embeddings", data=json.dumps({"model": model_id, "input": SENTENCE}))
    return session.post(
        url + f"/models/{model_id}", data=json.dumps({"inputs": SENTENCE}), headers={"X-Use-Cache": "false"}
    )


async def http_once(session, url: str, task: str, model_id: str) -> float:
    started = time.perf_counter()
    async with http_call(session, url, task, model_id) as reply:
        await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}")
    return time.perf_counter() - started


async def model_stats(stages: Stages, name: str) -> dict[str, tuple[int, int]]:
    """(count, ns) of each part of the model's time in the inference server (KServe statistics)."""
    reply = await stages.inference.ModelStatistics(
        service_pb2.ModelStatisticsRequest(name=name), metadata=stages.metadata, timeout=10
    )
    inf = reply.model_stats[0].inference_stats
    parts = ("queue", "compute_input", "compute_infer", "compute_output")
    return {p: (getattr(inf, p).count, getattr(inf, p).ns) for p in parts}


def stats_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each part, between two model_stats samples."""
    out = {}
    for part, (count, ns) in after.items():
        n = count - before[part][0]
        out[f"inference server: {part}"] = round((ns - before[part][1]) / n / 1e6, 3) if n else None
    return out


async def measure(url: str, ports: dict[str, int], token: str | None, args, mesh_pid: int | None) -> dict:
    import aiohttp

    model_id, task, model_name = TASKS[args.task]
    model_name = model_name or args.inference_name
    stages = Stages(ports, token)
    samples: dict[str, list] = defaultdict(list)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(20):  # warm-up: connections, caches, the model's first batches
            await http_once(session, url, task, model_id)
            await stage_round(stages, model_id, task, model_name, defaultdict(list))
        for name, stub in stages.health.items():  # with no model work around them
            for _ in range(100):
                dt, _ = await timed(stub.Check(health_pb2.HealthCheckRequest(service="")))
                samples[f"empty RPC ({name}), alone"].append(dt)
        stats_before = await model_stats(stages, model_name)
        for _ in range(args.rounds):
            samples["HTTP request"].append(await http_once(session, url, task, model_id))
            await stage_round(stages, model_id, task, model_name, samples)
            await asyncio.sleep(0.002)
        stats_after = await model_stats(stages, model_name)
        # CPU per request over HTTP requests alone (c=1, back to back).
        spies = start_spies(mesh_pid, args.spy) if args.spy and mesh_pid else []
        sums_before = await stage_sums(session, url)
        before = cpu_sample(mesh_pid) if mesh_pid else None
        count = args.rounds
        for _ in range(count):
            await http_once(session, url, task, model_id)
        after = cpu_sample(mesh_pid) if mesh_pid else None
        gateway_view = stage_ms(sums_before, await stage_sums(session, url))
        stop_spies(spies)
    await stages.close()
    table = {k: median_ms(v) for k, v in samples.items()}
    stages_sum = table["preprocess RPC"] + table["inference RPC"] + table["postprocess RPC"]
    table["gateway + HTTP (request - three RPCs)"] = round(table["HTTP request"] - stages_sum, 3)
    out = {
        "task": args.task,
        "rounds": args.rounds,
        "median_ms": table,
        "mean_ms": stats_ms(stats_before, stats_after) | gateway_view,
    }
    if before and after:
        out["cpu_us_per_request"] = cpu_per_request(before, after, count)
    return out


def start_spies(mesh_pid: int, folder: str) -> list:
    """py-spy (pip install py-spy) on each service while the HTTP-only phase runs: collapsed stacks,
    one file per service, idle frames left out (CPU, not wall)."""
    import subprocess

    import psutil

    Path(folder).mkdir(parents=True, exist_ok=True)
    spies = []
    for child in psutil.Process(mesh_pid).children():
        name = next((n for n in SERVICES if f"services.{n}.main" in " ".join(child.cmdline())), None)
        if name:
            out = Path(folder) / f"{name}.txt"
            command = ["py-spy", "record", "--pid", str(child.pid), "--rate", "400", "--format", "raw", "-o", str(out)]
            spies.append(
                subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
    time.sleep(1.0)  # let py-spy attach
    return spies


def stop_spies(spies: list) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)


async def stage_sums(session, url: str) -> dict[str, float]:
    """The gateway's own view of each stage (meshserve_gateway_stage_seconds: sum and count)."""
    async with session.get(url + "/metrics") as reply:
        text = await reply.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("meshserve_gateway_stage_seconds_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def stage_ms(before: dict, after: dict) -> dict[str, float]:
    out = {}
    for key, total in after.items():
        if "_sum{" in key:
            count_key = key.replace("_sum{", "_count{")
            n = after[count_key] - before.get(count_key, 0.0)
            stage = key.split('stage="')[1].split('"')[0]
            if n:
                out[f"gateway's view: {stage}"] = round((total - before.get(key, 0.0)) / n * 1000, 3)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="embeddings")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--url", help="a running mesh's gateway (else one is started)")
    p.add_argument("--ports", help="pre=PORT,inference=PORT,post=PORT of a running mesh")
    p.add_argument("--token", help="a running mesh's service token")
    p.add_argument("--pid", type=int, help="a running mesh's supervisor pid (CPU per request)")
    p.add_argument("--inference-name", default="sentiment-minilm", help="classification's inference model")
    p.add_argument("--spy", help="folder for py-spy's collapsed stacks of each service (HTTP-only phase)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for a started mesh")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import uvloop

    args = parse_args(argv)
    if args.url:
        ports = {k: int(v) for k, v in (kv.split("=") for kv in args.ports.split(","))}
        print(json.dumps(uvloop.run(measure(args.url, ports, args.token, args, args.pid)), indent=2))
        return 0
    from tests.helpers import start_mesh

    env = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(Path(tmp), env)
        try:
            ports = {"pre": mesh.ports["pre"], "inference": mesh.ports["inference"], "post": mesh.ports["post"]}
            result = uvloop.run(measure(mesh.url, ports, mesh.service_token, args, mesh.process.pid))
        finally:
            mesh.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
