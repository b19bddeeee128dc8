"""guidellm (the vLLM ecosystem's serving benchmark, unmodified, in its own venv) against the
gateway's chat route on the tiny model: a fresh `meshserve up` (embedded backend, no auth), then
`guidellm run` with its OpenAI HTTP backend and its defaults for the body (streaming, `ignore_eos`,
`stream_options.continuous_usage_stats`), synthetic prompts (`--prompt-tokens` in,
`--output-tokens` out, tokenized with the model's own tokenizer folder), one synchronous profile
and one concurrent profile (`--streams`), each bounded by `--max-requests`. The run fails if any
request errored. Writes bench/results/guidellm.json (guidellm's own figures per profile, and the
commands it ran).

    make bench-guidellm                                  # builds .venv-bench/guidellm first
    python -m bench.run_guidellm --guidellm .venv-bench/guidellm/bin/guidellm --max-requests 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import git_info, machine_info, write_atomic
from services.common.catalog import Catalog
from services.common.modelstore import model_dir
from tests.helpers import meshserve_home, start_mesh

LM = "meshserve/tiny-llama-chat"
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def guidellm_command(args, url: str, tokenizer: Path, profile: str, report: Path) -> list[str]:
    """`guidellm run` for one profile ("synchronous" or "concurrent,streams=N")."""
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    return [
        args.guidellm, "run",
        "--backend", f"kind=openai_http,target={url},model={LM}",
        "--profile", f"kind={profile}",
        "--constraint", f"kind=max_requests,count={args.max_requests}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--data", data,
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip


def summary(report: dict) -> list[dict]:
    """Per benchmark of guidellm's report: its profile, request counts and the headline figures."""
    out = []
    for bench in report.get("benchmarks", []):
        metrics = bench.get("metrics", {})
        stat = lambda name, key="mean", m=metrics: ((m.get(name) or {}).get("successful") or {}).get(key)  # noqa: E731
        out.append({
            "profile": (bench.get("config", {}).get("strategy") or {}).get("type_") or bench.get("type_"),
            "requests": metrics.get("request_totals", {}),
            "output_tokens_mean": stat("output_token_count"),
            "requests_per_s": stat("requests_per_second"),
            "output_tokens_per_s": stat("output_tokens_per_second"),
            "ttft_ms_median": stat("time_to_first_token_ms", "median"),
            "itl_ms_median": stat("inter_token_latency_ms", "median"),
            "latency_s_median": stat("request_latency", "median"),
        })  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", default=str(REPO / ".venv-bench/guidellm/bin/guidellm"))
    parser.add_argument("--max-requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    args = parser.parse_args()
    tokenizer = model_dir(Catalog.load(REPO / "catalog.yaml").get(LM), meshserve_home() / "models")
    results: dict = {"git": git_info(), "machine": machine_info(), "args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(Path(tmp))
        try:
            for profile in ("synchronous", f"concurrent,streams={args.streams}"):
                report = Path(tmp) / f"{profile.split(',')[0]}.json"
                command = guidellm_command(args, mesh.url, tokenizer, profile, report)
                done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0 or not report.is_file():
                    sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                    return 1
                full = json.loads(report.read_text())
                results["runs"].append({"command": " ".join(command[1:]), "benchmarks": summary(full)})
        finally:
            mesh.stop()
    write_atomic(RESULTS / "guidellm.json", json.dumps(results, indent=2).encode())
    errored = [b["requests"].get("errored", 0) for run in results["runs"] for b in run["benchmarks"]]
    print(json.dumps([b for run in results["runs"] for b in run["benchmarks"]], indent=2))
    return 0 if not any(errored) else 1


if __name__ == "__main__":
    sys.exit(main())
