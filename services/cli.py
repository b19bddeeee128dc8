"""The `meshserve` command: up [--model ...], serve <service>, models build|list|add|check|schema,
keys create|list|revoke, usage."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from services.common.catalog import Catalog, load_catalog
from services.common.modelstore import model_dir
from services.common.settings import CommonSettings


def _models(args) -> int:
    """`meshserve models build|list|add|check|schema`."""
    from services.common.catalog import CatalogFileError
    from services.models.from_folder import FolderError

    try:
        return MODEL_ACTIONS[args.action](args, CommonSettings())
    except (CatalogFileError, FolderError) as err:
        print(f"meshserve: {err}", file=sys.stderr)
        return 2


def _models_build(args, settings: CommonSettings) -> int:
    from services.models.build import build_all

    for entry, built in build_all(load_catalog(settings, strict=True), settings.models_dir, force=args.force):
        print(f"{entry.id}: {'built' if built else 'up to date'} -> {model_dir(entry, settings.models_dir)}")
    return 0


def _status(entry, models_dir) -> str:
    from services.common.modelstore import is_built

    if is_built(entry, models_dir):
        return "built"
    return {"path": "folder missing", "hub": "not fetched"}.get(entry.source.kind, "not built")


def _source(source) -> str:
    where = {"wheel": source.package, "build": source.builder, "path": source.path, "hub": source.repo}[source.kind]
    return f"{source.kind}:{where}" + (f"@{source.revision}" if source.revision else "")


def _models_list(args, settings: CommonSettings) -> int:
    problems: list[str] = []
    catalog = load_catalog(settings, problems=problems)
    rows = [("ID", "TASKS", "RUNTIME", "STATUS", "SOURCE")]
    for entry in catalog.models:
        status = _status(entry, settings.models_dir)
        rows.append((entry.id, ",".join(entry.tasks), entry.inference.runtime, status, _source(entry.source)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(f"{cell:{width}s}" for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    for problem in problems:
        print(f"meshserve: skipped {problem}", file=sys.stderr)
    return 0


def _models_add(args, settings: CommonSettings) -> int:
    from services.models.user_models import entry_file, infer, render

    inferred = infer(args.model, model_id=args.id, task=args.task)
    entry = inferred.entry
    target = entry_file(settings.catalog_d, entry.id)
    shipped = Catalog.load(settings.catalog)
    if any(e.id == entry.id for e in shipped.models):
        print(
            f"meshserve: {entry.id!r} is in the shipped catalog ({settings.catalog}); pick another --id",
            file=sys.stderr,
        )
        return 2
    existing = [
        e for e in load_catalog(settings).models if e.id == entry.id or e.inference.name == entry.inference.name
    ]
    if existing and not args.force:
        print(
            f"meshserve: {existing[0].id!r} is already in the catalog; --force replaces it, --id names another",
            file=sys.stderr,
        )
        return 2
    if existing:
        _remove_entry_files(settings, {e.id for e in existing})
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render(inferred, str(args.model))
    target.write_text(text)
    print(text, end="")
    print(f"wrote {target}", file=sys.stderr)
    return 0


def _remove_entry_files(settings: CommonSettings, ids: set[str]) -> None:
    """Delete the catalog.d files that hold these ids (before --force writes the new one)."""
    from services.common.catalog import CatalogFileError, entry_files, load_entry

    for path in entry_files(settings.catalog_d):
        try:
            if load_entry(path).id in ids:
                path.unlink()
        except CatalogFileError:
            continue


def _models_check(args, settings: CommonSettings) -> int:
    import yaml

    from services.common.catalog import CatalogFileError, load_entry, read_catalog

    path = Path(args.file)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogFileError(f"{path}: cannot read it: {exc}") from None
    if isinstance(data, dict) and "models" in data:  # a whole catalog file
        try:
            entries = read_catalog(path, None, strict=True).models
        except ValueError as exc:
            raise CatalogFileError(f"{path}: {exc}") from None
    else:
        entries = [load_entry(path)]
    for entry in entries:
        print(f"ok: {entry.id} ({entry.inference.runtime}; tasks {', '.join(entry.tasks)})")
    return 0


def _models_schema(args, settings: CommonSettings) -> int:
    from services.common.catalog import entry_schema

    print(entry_schema(), end="")
    return 0


MODEL_ACTIONS = {
    "build": _models_build,
    "list": _models_list,
    "add": _models_add,
    "check": _models_check,
    "schema": _models_schema,
}


def _serve(args) -> int:
    import importlib

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a service reads the HF cache, never the network
    if args.backend:
        os.environ["MESHSERVE_INFERENCE_BACKEND"] = args.backend
    module = importlib.import_module(f"services.{args.service}.main")
    module.main()
    return 0


def _replicas(items: list[str]) -> dict[str, int] | None:
    """--replicas SERVICE=N items; None (after one error line) when one is not that."""
    replicas = {}
    for item in items:
        stage, _, count = item.partition("=")
        if stage not in ("gateway", "preprocess", "inference", "postprocess") or not count.isdigit() or int(count) < 1:
            print(f"meshserve: --replicas takes SERVICE=N (N >= 1) with a mesh service, not {item!r}", file=sys.stderr)
            return None
        replicas[stage] = int(count)
    return replicas


def _run_catalog(args, settings: CommonSettings) -> Catalog:
    """What `up` serves: the catalog (+ catalog.d), or only the --model folders (beside the catalog
    with --with-catalog), written to $MESHSERVE_HOME/run/catalog.yaml for the children."""
    from services.models.user_models import infer, write_run_catalog

    if not args.model:
        return load_catalog(settings, strict=True)
    entries = list(load_catalog(settings, strict=True).models) if args.with_catalog else []
    for spec in args.model:
        entry = infer(spec).entry
        clash = next((e for e in entries if e.id == entry.id or e.inference.name == entry.inference.name), None)
        if clash is not None:
            raise ValueError(f"--model {spec}: id {entry.id!r} is already served ({clash.id}); name it ID={spec}")
        entries.append(entry)
    path = write_run_catalog(settings.home, entries)
    os.environ["MESHSERVE_CATALOG"] = str(path.resolve())
    os.environ["MESHSERVE_CATALOG_DIR"] = str((settings.home / "run" / "no-catalog.d").resolve())
    return Catalog.load(path)


TRITON_MISSING = (
    "meshserve: --backend triton needs NVIDIA Triton, which is not installed: pip install 'meshserve[triton]' "
    "(nvidia-pytriton ships tritonserver; x86_64 Linux), or set MESHSERVE_INFERENCE_TRITON_BINARY to a "
    "tritonserver binary. The embedded backend (the default) needs neither."
)


def triton_installed() -> bool:
    """A tritonserver to run: nvidia-pytriton's, or the binary MESHSERVE_INFERENCE_TRITON_BINARY names."""
    if os.environ.get("MESHSERVE_INFERENCE_TRITON_BINARY"):
        return True
    try:
        return importlib.util.find_spec("pytriton") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: not importable
        return False


def _up(args) -> int:
    import json

    import uvloop

    from services.models.build import build_all
    from services.supervisor import Supervisor, SupervisorSettings

    os.environ["MESHSERVE_INFERENCE_BACKEND"] = args.backend
    if args.backend == "triton" and not triton_installed():
        print(TRITON_MISSING, file=sys.stderr)
        return 2
    if args.no_auth:
        os.environ["MESHSERVE_GATEWAY_AUTH"] = "false"
    replicas = _replicas(args.replicas)
    if replicas is None:
        return 2
    if replicas:
        os.environ["MESHSERVE_SUPERVISOR_REPLICAS"] = json.dumps(replicas)
    settings = CommonSettings()
    try:  # nothing starts unless every model can be served
        catalog = _run_catalog(args, settings)
    except ValueError as err:  # FolderError, CatalogFileError, duplicate ids
        print(f"meshserve: {err}", file=sys.stderr)
        return 2
    if not args.no_build:
        for entry, built in build_all(catalog, settings.models_dir):
            if built:
                print(f"built {entry.id}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the services read the HF cache, never the network
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
    from services.gateway.ledger import LedgerSchemaError
    from services.gateway.service.admin import KeyRequest, create_key
    from services.gateway.service.validation import parse

    try:
        store = _key_store()
    except LedgerSchemaError as exc:  # e.g. a Postgres database behind the code's revision
        print(f"meshserve keys: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "create":

            def items(text: str | None) -> list[str]:
                return [s.strip() for s in (text or "").split(",") if s.strip()]

            # The REST route's validation and creation, so that both refuse and store alike.
            spec = parse(
                KeyRequest,
                {
                    "name": args.name, "scopes": items(args.scopes), "models": items(args.models),
                    "tasks": items(args.tasks), "providers": items(args.providers),
                    "requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
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


def _db(args) -> int:
    """The usage ledger's schema in the gateway's database: its revision, or an upgrade to the head."""
    from services.gateway import db
    from services.gateway.ledger import migrate
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings()
    engine = db.make_engine(settings.database_url or db.default_url(settings.home))
    where = engine.url.render_as_string(hide_password=True)
    try:
        if args.action == "upgrade":
            before, after = migrate.upgrade(engine, args.revision)
            print(f"{where}: {before or '(none)'} -> {after}" if before != after else f"{where}: at {after} already")
        else:
            print(f"{where}: {migrate.current(engine) or '(none)'} (this release: {migrate.head()})")
    finally:
        engine.dispose()
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


def _up_parser(sub) -> None:
    up = sub.add_parser("up", help="build models if needed and run the four services")
    up.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[ID=]PATH_OR_REPO",
        help="serve this model folder or Hugging Face hub repo (repeatable), alone unless --with-catalog; "
        "default id: local/<folder name>, or the repo id",
    )
    up.add_argument("--with-catalog", action="store_true", help="serve the --model models beside the catalog's")
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


def _models_parser(sub) -> None:
    models = sub.add_parser("models", help="add, list, check or build the catalog's models")
    actions = models.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="build, copy or fetch the catalog's models")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    actions.add_parser("list", help="id, tasks, runtime, status and source of every model served")
    add = actions.add_parser("add", help="infer a catalog entry from a model folder or hub repo (catalog.d)")
    add.add_argument("model", metavar="PATH_OR_REPO", help="a Hugging Face model folder, or org/name[@revision]")
    add.add_argument("--id", help="the model id (default: local/<folder name>, or the repo id)")
    add.add_argument("--task", help="the default task, among those the model can do")
    add.add_argument("--force", action="store_true", help="replace an entry with the same id")
    check = actions.add_parser("check", help="validate a catalog entry file (or a whole catalog)")
    check.add_argument("file")
    actions.add_parser("schema", help="print the JSON Schema of a catalog entry")
    models.set_defaults(func=_models)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="meshserve", description="Self-hosted inference API mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["gateway", "preprocess", "inference", "postprocess"])
    serve.add_argument("--backend", choices=["embedded", "triton"], help="inference only: the backend")
    serve.set_defaults(func=_serve)
    _models_parser(sub)
    usage = sub.add_parser("usage", help="usage totals from the gateway's ledger (UTC days)")
    usage.add_argument("--key", help="only this API key id")
    usage.add_argument("--model", help="only this model id")
    usage.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="from this day on")
    usage.add_argument("--until", type=_day, metavar="YYYY-MM-DD", help="up to this day, included")
    usage.add_argument("--by", choices=["day", "model", "key", "provider"], default="day", help="one row per group")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=_usage)
    database = sub.add_parser("db", help="the usage ledger's schema revision (Alembic): show it, or upgrade")
    db_actions = database.add_subparsers(dest="action", required=True)
    db_actions.add_parser("current", help="the database's revision and the one this release needs")
    db_upgrade = db_actions.add_parser("upgrade", help="upgrade the database (MESHSERVE_GATEWAY_DATABASE_URL)")
    db_upgrade.add_argument("--revision", default="head", help="the revision to reach (default: head)")
    database.set_defaults(func=_db)
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="create a key and print its token (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", default="inference,read", help="comma-separated: inference, read, admin")
    create.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    create.add_argument("--tasks", help="comma-separated tasks the key may run (default: all)")
    create.add_argument("--providers", help="comma-separated providers the key may use (default: all)")
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
