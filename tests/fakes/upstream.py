"""A fake remote inference server with run-time fault injection: one process speaking the
OpenAI (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models), TGI (/generate,
/generate_stream), TEI (/embed, /rerank) and HF Inference API (/models/{id}, /models/{id}/pipeline/{task},
/pipeline/{task}/{id}; a non-JSON body, e.g. an image, gets one label naming its type and size)
dialects with deterministic answers ("tok0 tok1 ..." one word per streamed chunk; vectors from a
hash of the text).

    python -m tests.fakes.upstream --port 0 --port-file PATH [--name NAME] [--latency-ms N]

It binds 127.0.0.1 and writes its port to PATH (and an always-listening control port to
PATH.control, so that `refuse` mode, which stops the main listener, can be switched back off).
Every response carries `x-request-id: fake-NAME-N`. Test hooks (on both ports):

    GET/POST /_control   {"mode": "ok" | "refuse" | "status" | "slow_first_byte" | "die_mid_stream" | "hang"
                                  | "raw_sse",
                          "status": 503, "retry_after": "2", "delay_ms": 500, "after_chunks": 2,
                          "latency_ms": 0, "tokens_per_s": null, "fail_next": null,
                          "location": null, "sse_body": ""}

`raw_sse`: a streamed answer's body is `sse_body` as it is (malformed events on purpose); `location`:
a Location header on `status` answers (redirects).
    GET/DELETE /_requests  the recorded requests: [{path, method, headers, body}] (headers lower-cased)
    GET /_stats            {"requests": N, "by_path": {...}}

`fail_next: N` limits the fault to the next N requests (then the mode goes back to ok; it does not
apply to `refuse`, which no request reaches). `refuse` closes the listener and every open
connection; setting the mode back to ok listens again on the same port. Setting `mode` without
`fail_next` clears it. For a bench, `--max-records 0` keeps no requests. Tests use `start_fake(tmp_path, name)` -> FakeUpstream (a subprocess, stopped by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

HOST = "127.0.0.1"
JSON = "application/json"
DEFAULT_TOKENS = 16
DEFAULT_DIM = 8
CONTROL_KEYS = (
    "mode", "status", "retry_after", "delay_ms", "after_chunks", "latency_ms", "tokens_per_s", "fail_next",
    "location", "sse_body",
)  # fmt: skip
MODES = ("ok", "refuse", "status", "slow_first_byte", "die_mid_stream", "hang", "raw_sse")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Fault(Exception):
    """The connection is to be dropped without an answer."""


# ---------------------------------------------------------------- deterministic content


def words(value: Any) -> int:
    """Whitespace words in a prompt, a message list (string or text-part contents) or a list of texts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(v) for v in value)
    if isinstance(value, dict):
        if "content" in value:
            return words(value["content"])
        if value.get("type") == "text":
            return words(value.get("text", ""))
    return 0


def token(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def vector(text: str, dim: int) -> list[float]:
    """A unit vector seeded by the text's hash: equal texts, equal vectors."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    rng = random.Random(seed)
    v = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def score(query: str, text: str) -> float:
    """A relevance logit: shared words count most, the hash breaks ties."""
    shared = len(set(query.lower().split()) & set(text.lower().split()))
    h = int.from_bytes(hashlib.blake2b(f"{query}\x00{text}".encode(), digest_size=4).digest(), "big")
    return shared * 2.0 + (h / 2**32) - 0.5


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hf_task_of(model: str, tasks: dict[str, str]) -> str:
    if model in tasks:
        return tasks[model]
    low = model.lower()
    if "embed" in low or "minilm" in low or "feature" in low:
        return "feature-extraction"
    if "class" in low or "sentiment" in low or "sst" in low:
        return "text-classification"
    return "text-generation"


# ---------------------------------------------------------------- the server state


class Fake:
    """The server's state: control values, counters, the recorded requests, the listeners."""

    def __init__(self, name: str, latency_ms: float, max_records: int, models: list[str], tasks: dict[str, str]):
        self.name = name
        self.models = models
        self.tasks = tasks
        self.n = 0
        self.by_path: dict[str, int] = {}
        self.records: deque[dict] = deque(maxlen=max_records or None)
        self.record = max_records > 0
        self.ctl: dict[str, Any] = {
            "mode": "ok",
            "status": 503,
            "retry_after": None,
            "delay_ms": 0,
            "after_chunks": 1,
            "latency_ms": latency_ms,
            "tokens_per_s": None,
            "fail_next": None,
            "location": None,
            "sse_body": "",
        }
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.port = 0

    # -- listener control

    async def listen(self) -> None:
        assert self.runner is not None
        self.site = web.TCPSite(self.runner, HOST, self.port, reuse_address=True, backlog=1024)
        await self.site.start()
        self.port = self.site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def refuse(self) -> None:
        if self.site is not None:
            await self.site.stop()
            self.site = None
        assert self.runner is not None and self.runner.server is not None
        for conn in list(self.runner.server.connections):
            conn.force_close()

    async def set_control(self, changes: dict) -> None:
        unknown = set(changes) - set(CONTROL_KEYS)
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown control keys {sorted(unknown)}")
        mode = changes.get("mode", self.ctl["mode"])
        if mode not in MODES:
            raise web.HTTPBadRequest(text=f"mode must be one of {MODES}")
        if "mode" in changes and "fail_next" not in changes:
            changes["fail_next"] = None
        self.ctl.update(changes)
        await self.apply_listening()

    async def apply_listening(self) -> None:
        if self.ctl["mode"] == "refuse" and self.site is not None:
            await self.refuse()
        elif self.ctl["mode"] != "refuse" and self.site is None:
            await self.listen()

    def fault(self) -> str:
        """The fault this request gets ('ok' for none), counting down fail_next."""
        mode = self.ctl["mode"]
        if mode == "ok":
            return mode
        left = self.ctl["fail_next"]
        if left is not None:
            if left <= 0:
                self.ctl["mode"], self.ctl["fail_next"] = "ok", None
                return "ok"
            self.ctl["fail_next"] = left - 1
            if left - 1 <= 0:
                self.ctl["mode"], self.ctl["fail_next"] = "ok", None
                if mode == "refuse":
                    asyncio.get_running_loop().create_task(self.apply_listening())
        return mode

    def next_id(self, request: web.Request, body: Any) -> str:
        self.n += 1
        path = request.path
        self.by_path[path] = self.by_path.get(path, 0) + 1
        if self.record:
            self.records.append(
                {
                    "path": path,
                    "method": request.method,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "body": body,
                }
            )
        return f"fake-{self.name}-{self.n}"


# ---------------------------------------------------------------- one request's answer


class Reply:
    """Writes one answer, applying the request's fault (status, slow first byte, death, hang)."""

    def __init__(self, fake: Fake, request: web.Request, rid: str, fault: str, openai: bool):
        self.fake, self.request, self.rid, self.fault, self.openai = fake, request, rid, fault, openai
        self.ctl = fake.ctl
        tps = self.ctl["tokens_per_s"]
        self.pace = 1.0 / float(tps) if tps else 0.0

    async def before(self) -> web.Response | None:
        """Latency, then the faults that act before the headers."""
        latency = self.ctl["latency_ms"]
        if latency:
            await asyncio.sleep(latency / 1000.0)
        if self.fault == "hang":
            await asyncio.sleep(3600)
        if self.fault == "slow_first_byte":
            await asyncio.sleep(float(self.ctl["delay_ms"]) / 1000.0)
        if self.fault == "refuse":
            raise Fault()
        if self.fault == "status":
            return self.error(int(self.ctl["status"]), f"fake {self.fake.name}: injected status {self.ctl['status']}")
        return None

    def error(self, status: int, message: str) -> web.Response:
        headers = {"x-request-id": self.rid}
        if self.ctl["retry_after"] is not None:
            headers["Retry-After"] = str(self.ctl["retry_after"])
        if self.ctl["location"]:
            headers["Location"] = str(self.ctl["location"])
        if self.openai:
            body = {"error": {"message": message, "type": "fake_error", "code": status}}
        else:
            body = {"error": message, "error_type": "fake_error"}
        return web.Response(status=status, body=orjson.dumps(body), content_type=JSON, headers=headers)

    async def json(self, payload: Any, headers: dict[str, str] | None = None) -> web.StreamResponse:
        data = orjson.dumps(payload)
        hdrs = {"x-request-id": self.rid, **(headers or {})}
        if self.fault != "die_mid_stream":
            return web.Response(body=data, content_type=JSON, headers=hdrs)
        resp = web.StreamResponse(headers={**hdrs, "Content-Type": JSON, "Content-Length": str(len(data))})
        await resp.prepare(self.request)
        await resp.write(data[: len(data) // 2])
        raise Fault()

    async def sse(self, events: list[bytes]) -> web.StreamResponse:
        """Streams `events` (each a full `data: ...\\n\\n` block), paced and maybe cut."""
        resp = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": self.rid})
        await resp.prepare(self.request)
        if self.fault == "raw_sse":
            events = [str(self.ctl["sse_body"]).encode()]
        cut = int(self.ctl["after_chunks"]) if self.fault == "die_mid_stream" else -1
        for i, event in enumerate(events):
            if i == cut:
                raise Fault()
            if self.pace and i:
                await asyncio.sleep(self.pace)
            await resp.write(event)
        await resp.write_eof()
        return resp


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# ---------------------------------------------------------------- dialects


def gen_count(body: dict, key: str = "max_tokens") -> tuple[int, str]:
    n = body.get(key)
    if n is None and key == "max_tokens":
        n = body.get("max_completion_tokens")
    if n is None:
        return DEFAULT_TOKENS, "stop"
    return max(0, int(n)), "length"


async def openai_generate(reply: Reply, body: dict, chat: bool) -> web.StreamResponse:
    n, finish = gen_count(body)
    prompt = words(body.get("messages")) if chat else words(body.get("prompt", ""))
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    model, created = body.get("model", "fake"), int(time.time())
    oid = ("chatcmpl-" if chat else "cmpl-") + reply.rid
    obj = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        text = "".join(token(i) for i in range(n))
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return await reply.json(
            {"id": oid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}
        )
    obj += ".chunk" if chat else ""
    head = {"id": oid, "object": obj, "created": created, "model": model}

    def chunk(text: str | None, reason: str | None) -> bytes:
        if chat:
            delta = {} if text is None else {"role": "assistant", "content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return sse({**head, "choices": [choice]})

    events = [chunk(token(i), None) for i in range(n)]
    events.append(chunk(None, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(sse({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return await reply.sse(events)


async def openai_embeddings(reply: Reply, body: dict) -> web.StreamResponse:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return reply.error(400, "input must be a string or a list of strings")
    dim = int(body.get("dimensions") or DEFAULT_DIM)
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(texts):
        v = vector(text, dim)
        emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *v)).decode() if b64 else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = words(texts)
    return await reply.json(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake"),
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )


async def tgi_generate(reply: Reply, body: dict, stream: bool, listed: bool = False) -> web.StreamResponse:
    """TGI /generate and /generate_stream (HF's text-generation answers the same, as a list)."""
    params = body.get("parameters") or {}
    n, finish = gen_count(params, "max_new_tokens")
    finish = "length" if finish == "length" else "eos_token"
    text = "".join(token(i) for i in range(n))
    prompt = words(body.get("inputs", ""))
    if not stream:
        out: dict[str, Any] = {"generated_text": text}
        if params.get("details"):
            out["details"] = {
                "finish_reason": finish,
                "generated_tokens": n,
                "seed": params.get("seed"),
                "prefill": [],
                "tokens": [{"id": i, "text": token(i), "logprob": -0.5, "special": False} for i in range(n)],
            }
        return await reply.json(
            [out] if listed else out, {"x-prompt-tokens": str(prompt), "x-generated-tokens": str(n)}
        )
    events = []
    for i in range(n):
        last = i == n - 1
        events.append(
            sse(
                {
                    "index": i + 1,
                    "token": {"id": i, "text": token(i), "logprob": -0.5, "special": False},
                    "generated_text": text if last else None,
                    "details": {
                        "finish_reason": finish,
                        "generated_tokens": n,
                        "seed": params.get("seed"),
                        "input_length": prompt,
                    }
                    if last
                    else None,
                }
            )
        )
    if n == 0:
        events.append(
            sse(
                {
                    "index": 1,
                    "token": {"id": 0, "text": "", "logprob": 0.0, "special": True},
                    "generated_text": "",
                    "details": {"finish_reason": finish, "generated_tokens": 0, "seed": None, "input_length": prompt},
                }
            )
        )
    return await reply.sse(events)


def as_texts(inputs: Any) -> tuple[list[str], bool] | None:
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        return inputs, False
    return None


async def tei_embed(reply: Reply, body: dict) -> web.StreamResponse:
    texts = as_texts(body.get("inputs"))
    if texts is None:
        return reply.error(422, "inputs must be a string or a list of strings")
    dim = int(body.get("dimensions") or DEFAULT_DIM)
    return await reply.json([vector(t, dim) for t in texts[0]], {"x-compute-tokens": str(words(texts[0]))})


async def tei_rerank(reply: Reply, body: dict) -> web.StreamResponse:
    query, texts = body.get("query"), body.get("texts")
    if not isinstance(query, str) or not isinstance(texts, list) or not texts:
        return reply.error(422, "query (string) and texts (non-empty list) are required")
    raw = bool(body.get("raw_scores"))
    ranked = [{"index": i, "score": s if raw else sigmoid(s)} for i, s in enumerate(score(query, t) for t in texts)]
    ranked.sort(key=lambda r: -r["score"])
    if body.get("return_text"):
        for r in ranked:
            r["text"] = texts[r["index"]]
    return await reply.json(ranked, {"x-compute-tokens": str(words(query) * len(texts) + words(texts))})


async def hf_model(reply: Reply, body: dict, model: str, task: str | None) -> web.StreamResponse:
    task = task or hf_task_of(model, reply.fake.tasks)
    if task == "text-generation":
        return await tgi_generate(reply, body, bool(body.get("stream")), listed=True)
    inputs = body.get("inputs")
    if task == "sentence-similarity" and isinstance(inputs, dict):
        source = vector(str(inputs.get("source_sentence", "")), DEFAULT_DIM)
        others = [vector(str(t), DEFAULT_DIM) for t in inputs.get("sentences") or []]
        return await reply.json([sum(a * b for a, b in zip(source, v, strict=True)) for v in others])
    texts = as_texts(inputs)
    if texts is None:
        return reply.error(400, "inputs must be a string or a list of strings")
    if task == "feature-extraction":
        vecs = [vector(t, DEFAULT_DIM) for t in texts[0]]
        return await reply.json(vecs[0] if texts[1] else vecs)
    if task == "text-classification":
        out = []
        for t in texts[0]:
            p = sigmoid(score("good great fine", t))
            out.append(
                sorted(
                    [{"label": "POSITIVE", "score": p}, {"label": "NEGATIVE", "score": 1 - p}],
                    key=lambda r: -r["score"],
                )
            )
        return await reply.json(out)
    return reply.error(400, f"fake {reply.fake.name} does not run task {task!r}")


# ---------------------------------------------------------------- handlers


def build_app(fake: Fake, control_only: bool = False) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(control_routes(fake))
    if not control_only:
        app.add_routes(api_routes(fake))
    return app


def control_routes(fake: Fake) -> list[web.RouteDef]:
    async def get_control(_: web.Request) -> web.Response:
        return web.json_response({**fake.ctl, "name": fake.name, "port": fake.port}, dumps=_dumps)

    async def post_control(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read() or b"{}")
        await fake.set_control(body)
        return web.json_response({**fake.ctl, "name": fake.name, "port": fake.port}, dumps=_dumps)

    async def get_requests(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(fake.records)), content_type=JSON)

    async def clear_requests(_: web.Request) -> web.Response:
        fake.records.clear()
        return web.Response(body=b"[]", content_type=JSON)

    async def get_stats(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"requests": fake.n, "by_path": fake.by_path}), content_type=JSON)

    return [
        web.get("/_control", get_control),
        web.post("/_control", post_control),
        web.get("/_requests", get_requests),
        web.delete("/_requests", clear_requests),
        web.post("/_requests/clear", clear_requests),
        web.get("/_stats", get_stats),
    ]


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def api_routes(fake: Fake) -> list[web.RouteDef]:
    def handler(kind: str):
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            rid = fake.next_id(request, body)
            reply = Reply(fake, request, rid, fake.fault(), openai=kind.startswith("openai"))
            try:
                early = await reply.before()
                if early is not None:
                    return early
                if kind == "hf" and not request.content_type.endswith("json"):
                    label = f"{request.content_type}:{len(raw)}"  # e.g. an image for image-classification
                    return await reply.json([{"label": label, "score": 1.0}])
                if not isinstance(body, dict):
                    return reply.error(400, "the body must be a JSON object")
                return await dispatch(kind, reply, body, request)
            except Fault:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError() from None

        return handle

    return [
        web.post("/v1/chat/completions", handler("openai-chat")),
        web.post("/models/{model:.+}/v1/chat/completions", handler("openai-chat")),
        web.post("/v1/completions", handler("openai-completion")),
        web.post("/v1/embeddings", handler("openai-embed")),
        web.get("/v1/models", handler("openai-models")),
        web.post("/generate", handler("tgi-generate")),
        web.post("/generate_stream", handler("tgi-stream")),
        web.post("/embed", handler("tei-embed")),
        web.post("/rerank", handler("tei-rerank")),
        web.post("/pipeline/{task}/{model:.+}", handler("hf")),
        web.post("/models/{model:.+}/pipeline/{task}", handler("hf")),
        web.post("/models/{model:.+}", handler("hf")),
    ]


async def dispatch(kind: str, reply: Reply, body: dict, request: web.Request) -> web.StreamResponse:
    if kind == "openai-chat":
        return await openai_generate(reply, body, chat=True)
    if kind == "openai-completion":
        return await openai_generate(reply, body, chat=False)
    if kind == "openai-embed":
        return await openai_embeddings(reply, body)
    if kind == "openai-models":
        return await reply.json(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in reply.fake.models],
            }
        )
    if kind in ("tgi-generate", "tgi-stream"):
        return await tgi_generate(reply, body, stream=kind == "tgi-stream")
    if kind == "tei-embed":
        return await tei_embed(reply, body)
    if kind == "tei-rerank":
        return await tei_rerank(reply, body)
    return await hf_model(reply, body, request.match_info["model"], request.match_info.get("task"))


# ---------------------------------------------------------------- process


async def serve(args: argparse.Namespace) -> None:
    tasks = dict(t.split("=", 1) for t in args.hf_task)
    fake = Fake(args.name, args.latency_ms, args.max_records, args.models or ["fake-model"], tasks)
    fake.port = args.port
    fake.runner = web.AppRunner(build_app(fake), handle_signals=False, access_log=None, handler_cancellation=True)
    await fake.runner.setup()
    await fake.listen()
    control = web.AppRunner(build_app(fake, control_only=True), handle_signals=False, access_log=None)
    await control.setup()
    csite = web.TCPSite(control, HOST, 0)
    await csite.start()
    cport = csite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if args.port_file:
        write_port_files(args.port_file, fake.port, cport)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await control.cleanup()
    await fake.runner.cleanup()


def write_port_files(path: str, port: int, control_port: int) -> None:
    """The control port first, then the port: once PATH exists, both can be read."""
    for target, value in ((f"{path}.control", control_port), (path, port)):
        with open(f"{target}.tmp", "w") as f:
            f.write(str(value))
        os.replace(f"{target}.tmp", target)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", default=None)
    p.add_argument("--name", default="up")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--max-records", type=int, default=10000, help="requests kept for /_requests (0: none)")
    p.add_argument("--models", nargs="*", default=None, help="ids for /v1/models")
    p.add_argument("--hf-task", action="append", default=[], help="MODEL=TASK for /models/{id} (else by name)")
    args = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args))


# ---------------------------------------------------------------- the test helper


REPO = Path(__file__).resolve().parents[2]


class FakeUpstream:
    """A running fake (a subprocess): `.url`, `.control(**kw)`, `.requests()`, `.stop()`, `.kill()`."""

    def __init__(self, proc: subprocess.Popen, port: int, control_port: int, name: str, port_file: Path):
        self.proc, self.port, self.control_port, self.name, self.port_file = proc, port, control_port, name, port_file
        self.url = f"http://{HOST}:{port}"
        self.control_url = f"http://{HOST}:{control_port}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(self.control_url + path, data=data, method=method, headers={"Content-Type": JSON})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())

    def control(self, **kw: Any) -> dict:
        """Sets fault/latency values (see the module docstring); no arguments: reads them."""
        return self._call("POST", "/_control", kw) if kw else self._call("GET", "/_control")

    def reset(self) -> dict:
        return self.control(mode="ok", latency_ms=0, tokens_per_s=None, retry_after=None)

    def requests(self) -> list[dict]:
        return self._call("GET", "/_requests")

    def clear(self) -> None:
        self._call("DELETE", "/_requests")

    def stats(self) -> dict:
        return self._call("GET", "/_stats")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fake(
    tmp_path: Path,
    name: str = "up",
    *,
    port: int = 0,
    latency_ms: float = 0.0,
    models: list[str] | None = None,
    hf_tasks: dict[str, str] | None = None,
    max_records: int = 10000,
    start_timeout_s: float = 30.0,
) -> FakeUpstream:
    """Starts the fake as a process and waits (bounded) for its port file."""
    port_file = Path(tmp_path) / f"fake-{name}-{os.getpid()}-{time.monotonic_ns()}.port"
    cmd = [
        sys.executable,
        "-m",
        "tests.fakes.upstream",
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        "--name",
        name,
        "--latency-ms",
        str(latency_ms),
        "--max-records",
        str(max_records),
    ]
    if models:
        cmd += ["--models", *models]
    for model, task in (hf_tasks or {}).items():
        cmd += ["--hf-task", f"{model}={task}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + start_timeout_s
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"fake upstream {name} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"fake upstream {name} did not listen within {start_timeout_s}s")
        time.sleep(0.02)
    bound = int(port_file.read_text())
    control_port = int(Path(f"{port_file}.control").read_text())
    return FakeUpstream(proc, bound, control_port, name, port_file)


if __name__ == "__main__":
    main()
