"""The `meshserve` command: up, serve <service>, models build|list."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.common.catalog import Catalog
from services.common.settings import CommonSettings


def _models(args) -> int:
    from services.common.modelstore import build_all, is_built

    settings = CommonSettings()
    catalog = Catalog.load(settings.catalog)
    if args.action == "list":
        for entry in catalog.models:
            state = "built" if is_built(entry, settings.models_dir) else "not built"
            print(f"{entry.id:45s} {', '.join(entry.tasks):40s} {state}")
        return 0
    for entry, built in build_all(catalog, settings.models_dir, force=args.force):
        print(f"{entry.id}: {'built' if built else 'up to date'} -> {entry.store_dir(settings.models_dir)}")
    return 0


def _serve(args) -> int:
    import importlib

    if args.backend:
        os.environ["MESHSERVE_INFERENCE_BACKEND"] = args.backend
    module = importlib.import_module(f"services.{args.service}.main")
    module.main()
    return 0


def _up(args) -> int:
    import uvloop

    from services.common.modelstore import build_all
    from services.supervisor import Supervisor, SupervisorSettings

    os.environ["MESHSERVE_INFERENCE_BACKEND"] = args.backend
    if args.replicas:
        import json

        replicas = {}
        for item in args.replicas:
            stage, _, count = item.partition("=")
            if stage not in ("preprocess", "inference", "postprocess") or not count.isdigit():
                print(f"meshserve: --replicas takes STAGE=N with a stage of the mesh, not {item!r}", file=sys.stderr)
                return 2
            replicas[stage] = int(count)
        os.environ["MESHSERVE_SUPERVISOR_REPLICAS"] = json.dumps(replicas)
    settings = CommonSettings()
    if not args.no_build:
        for entry, built in build_all(Catalog.load(settings.catalog), settings.models_dir):
            if built:
                print(f"built {entry.id}")
    return uvloop.run(Supervisor(SupervisorSettings()).run())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="meshserve", description="Self-hosted inference API mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build models if needed and run the four services")
    up.add_argument("--backend", choices=["embedded", "triton"], default="embedded")
    up.add_argument("--no-build", action="store_true", help="do not build missing models first")
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="run N replicas of a stage (preprocess, inference, postprocess) behind a real Envoy",
    )
    up.set_defaults(func=_up)
    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["gateway", "preprocess", "inference", "postprocess"])
    serve.add_argument("--backend", choices=["embedded", "triton"], help="inference only: the backend")
    serve.set_defaults(func=_serve)
    models = sub.add_parser("models", help="build or list the catalog's models")
    models.add_argument("action", choices=["build", "list"])
    models.add_argument("--force", action="store_true", help="rebuild even when up to date")
    models.set_defaults(func=_models)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
