"""The generated files that the deploy manifests ship, and the one command that rewrites them.

    python -m deploy.k8s.artifacts            # rewrite every generated file
    python -m deploy.k8s.artifacts --check    # exit 1 naming the stale ones (tests/deploy does the same)

Kubernetes mounts its Envoy config from a ConfigMap that kustomize builds from a file, and compose
mounts one from a file: both are our generator's output for a topology (deploy/envoy/generate.py),
committed beside the manifests so that a reviewer sees what runs, and never edited by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from deploy.envoy.generate import render

ROOT = Path(__file__).resolve().parents[2]

# generated file -> what it must contain
ARTIFACTS: dict[str, Callable[[], str]] = {
    "deploy/k8s/base/generated/envoy.yaml": lambda: render(ROOT / "deploy/envoy/topology.k8s.yaml"),
    "deploy/docker/envoy.yaml": lambda: render(ROOT / "deploy/docker/topology.compose.yaml"),
}


def stale(root: Path = ROOT, artifacts: dict[str, Callable[[], str]] = ARTIFACTS) -> list[str]:
    """Generated files whose content differs from what their source produces now."""
    out = []
    for path, produce in artifacts.items():
        target = root / path
        if not target.exists() or target.read_text() != produce():
            out.append(path)
    return out


def write(root: Path = ROOT, artifacts: dict[str, Callable[[], str]] = ARTIFACTS) -> list[str]:
    """Rewrite every generated file; returns their paths."""
    for path, produce in artifacts.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(produce())
    return list(artifacts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        paths = stale()
        for path in paths:
            print(f"stale: {path} (run python -m deploy.k8s.artifacts)", file=sys.stderr)
        return 1 if paths else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
