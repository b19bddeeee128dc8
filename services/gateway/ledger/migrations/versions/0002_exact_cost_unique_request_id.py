"""Money and idempotence: `cost_usd` exact to the nano-dollar, one row per `request_id`.

Postgres: cost_usd becomes NUMERIC(18, 9), each float rounded to 9 places through its shortest
decimal form. SQLite (whose NUMERIC is a float): an INTEGER of nano-dollars, each float multiplied
and rounded. Rows that share a request id (a writer that died after its commit and before its
acknowledgement wrote its batch twice) keep it on the oldest row; each later one, and a row with an
empty id, gets a generated unique id: `<id>~dup<row id>` (`legacy~<row id>` for an empty one), so
nothing is deleted and the doubles stay visible. Then a unique index makes a retried insert a no-op.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("services.gateway.ledger.migrate")

usage = sa.table("usage", sa.column("id", sa.BigInteger), sa.column("request_id", sa.String), sa.column("cost_usd"))


def _unique_request_ids() -> None:
    """(The oldest row of each id, found by one GROUP BY: a correlated EXISTS per row, with no index
    on request_id yet, takes quadratic time on a ledger of a few hundred thousand rows.)"""
    oldest = sa.select(sa.func.min(usage.c.id)).group_by(usage.c.request_id)
    duplicate = usage.c.id.not_in(oldest.scalar_subquery())
    row_id = sa.cast(usage.c.id, sa.String)
    new_id = sa.case(
        (usage.c.request_id == "", sa.literal("legacy~") + row_id),
        else_=sa.func.substr(usage.c.request_id, 1, 96, type_=sa.String()) + sa.literal("~dup") + row_id,
    )
    renamed = op.get_bind().execute(
        usage.update().where(sa.or_(usage.c.request_id == "", duplicate)).values(request_id=new_id)
    )
    if renamed.rowcount:
        log.warning("usage ledger: %d rows shared a request id or had none; each got a generated one", renamed.rowcount)


def upgrade() -> None:
    _unique_request_ids()
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE usage SET cost_usd = ROUND(cost_usd * 1000000000)")
        with op.batch_alter_table("usage", recreate="always") as batch:
            batch.alter_column(
                "cost_usd", type_=sa.BigInteger(), existing_nullable=False, comment="USD, exact to the nano-dollar"
            )
    else:
        op.alter_column(
            "usage",
            "cost_usd",
            type_=sa.Numeric(18, 9),
            existing_nullable=False,
            postgresql_using="round(cost_usd::numeric, 9)",
            comment="USD, exact to the nano-dollar",
        )
    op.create_index("ux_usage_request_id", "usage", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_usage_request_id", "usage")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("usage", recreate="always") as batch:
            batch.alter_column("cost_usd", type_=sa.Float(), existing_nullable=False)
        op.execute("UPDATE usage SET cost_usd = cost_usd / 1000000000.0")
    else:
        op.alter_column("usage", "cost_usd", type_=sa.Float(), existing_nullable=False)
