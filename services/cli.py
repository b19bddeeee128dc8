"""The `meshserve` command: up, serve <service>, models build|list, keys create|list|revoke, usage."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.common.catalog import Catalog
from services.common.settings import CommonSettings


def _models(args) -> int:
    from services.common.modelstore import is_built
    from services.models.build import build_all

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

    from services.models.build import build_all
    from services.supervisor import Supervisor, SupervisorSettings

    os.environ["MESHSERVE_INFERENCE_BACKEND"] = args.backend
    if args.no_auth:
        os.environ["MESHSERVE_GATEWAY_AUTH"] = "false"
    if args.replicas:
        import json

        replicas = {}
        for item in args.replicas:
            stage, _, count = item.partition("=")
            if (
                stage not in ("gateway", "preprocess", "inference", "postprocess")
                or not count.isdigit()
                or int(count) < 1
            ):
                print(
                    f"meshserve: --replicas takes SERVICE=N (N >= 1) with a mesh service, not {item!r}", file=sys.stderr
                )
                return 2
            replicas[stage] = int(count)
        os.environ["MESHSERVE_SUPERVISOR_REPLICAS"] = json.dumps(replicas)
    settings = CommonSettings()
    if not args.no_build:
        for entry, built in build_all(Catalog.load(settings.catalog), settings.models_dir):
            if built:
                print(f"built {entry.id}")
    return uvloop.run(Supervisor(SupervisorSettings()).run())


def _key_store():
    from services.gateway import db
    from services.gateway.control.keys import KeyStore
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings()
    store = KeyStore(db.make_engine(settings.database_url or db.default_url(settings.home)))
    store.init_schema()
    return store


def _keys(args) -> int:
    """API keys in the gateway's database; running gateways pick changes up within a second."""
    import json

    from services.common.errors import MeshError
    from services.gateway.service.admin import KeyRequest, create_key
    from services.gateway.service.validation import parse

    store = _key_store()
    try:
        if args.action == "create":

            def items(text: str | None) -> list[str]:
                return [s.strip() for s in (text or "").split(",") if s.strip()]

            # The REST route's validation and creation, so that both refuse and store alike.
            spec = parse(
                KeyRequest,
                {
                    "name": args.name, "scopes": items(args.scopes), "models": items(args.models),
                    "tasks": items(args.tasks), "requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
                    "concurrent_requests": args.concurrency, "budget_usd": args.budget_usd,
                    "budget_period": args.budget_period,
                    "expires_in_s": args.expires_days * 86400 if args.expires_days else None,
                },
            )  # fmt: skip
            key, token = create_key(store, spec)
            print(json.dumps(key.public(), indent=2))
            print(f"token (shown once, store it now): {token}")
        elif args.action == "list":
            for key in store.all():
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.id:14s} {state:8s} {','.join(key.scopes):22s} {key.name}")
        else:
            print(json.dumps(store.revoke(args.id).public(), indent=2))
    except MeshError as err:
        print(f"meshserve: {err.message}", file=sys.stderr)
        return 2
    finally:
        store.engine.dispose()
    return 0


def _day(text: str):
    """A YYYY-MM-DD argument, with a message that says so when it is not one."""
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, not {text!r}") from None


def _usage(args) -> int:
    """Totals from the usage ledger (the gateway's database), grouped by day, model or key."""
    import asyncio
    import json
    from datetime import UTC, datetime, time, timedelta

    import sqlalchemy as sa

    from services.gateway import db
    from services.gateway.ledger import UsageLedger

    engine = db.make_engine(os.environ.get("MESHSERVE_GATEWAY_DATABASE_URL") or db.default_url(CommonSettings().home))
    try:
        rows = []
        if sa.inspect(engine).has_table("usage"):
            rows = asyncio.run(
                UsageLedger(engine).totals(
                    by=args.by,
                    key_id=args.key,
                    model=args.model,
                    since=args.since and datetime.combine(args.since, time(), UTC),
                    until=args.until and datetime.combine(args.until + timedelta(days=1), time(), UTC),
                )
            )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_usage_table(rows, "key_id" if args.by == "key" else args.by)
    return 0


def _print_usage_table(rows: list[dict], group: str) -> None:
    names = ["requests", "input_tokens", "output_tokens", "items", "compute_s", "cost_usd"]
    print(f"{group:45s}" + "".join(f"{name:>15s}" for name in names))
    for row in rows:
        values = [*(row[name] for name in names[:4]), f"{row['compute_s']:.3f}", f"{row['cost_usd']:.6f}"]
        print(f"{row[group] or '-':45s}" + "".join(f"{value:>15}" for value in values))


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
        "--no-auth", action="store_true", help="no API keys, rate limits or budgets: for experiments only (warns)"
    )
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="run N replicas of a service (gateway, preprocess, inference, postprocess) behind a real Envoy",
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
    usage = sub.add_parser("usage", help="usage totals from the gateway's ledger (UTC days)")
    usage.add_argument("--key", help="only this API key id")
    usage.add_argument("--model", help="only this model id")
    usage.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="from this day on")
    usage.add_argument("--until", type=_day, metavar="YYYY-MM-DD", help="up to this day, included")
    usage.add_argument("--by", choices=["day", "model", "key"], default="day", help="one row per day, model or key")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=_usage)
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="create a key and print its token (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", default="inference,read", help="comma-separated: inference, read, admin")
    create.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    create.add_argument("--tasks", help="comma-separated tasks the key may run (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    create.add_argument("--concurrency", type=int, help="concurrent requests")
    create.add_argument("--budget-usd", type=float, help="spending budget per period")
    create.add_argument("--budget-period", choices=["day", "month", "total"], help="default: month")
    create.add_argument("--expires-days", type=float, help="lifetime in days (default: no expiry)")
    key_actions.add_parser("list", help="list keys (never their tokens)")
    revoke = key_actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("id")
    keys.set_defaults(func=_keys)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
