"""Alembic's environment for the usage ledger: it runs on the connection that `ledger.migrate` opened
and locked (config.attributes["connection"]), inside that connection's transaction. No alembic.ini:
`meshserve db upgrade` is the command (and `ledger.migrate.config()` the Config for Alembic's own)."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the ledger's migrations with `meshserve db upgrade` (services.gateway.ledger.migrate)")
context.configure(connection=connection, render_as_batch=True)  # SQLite alters a table by copying it
with context.begin_transaction():  # the caller's transaction already: a no-op
    context.run_migrations()
