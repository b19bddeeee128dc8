"""The API-key tables join the migrations: `api_keys` and `key_version`, and budgets as exact money.

Releases before this one had the key store create its tables itself (SQLAlchemy's create_all, then
the columns an older release's table lacked). On such a database the tables are adopted as they
are: the missing columns are added (secret_salt, providers), a `key_version` of the pre-release
form (a counter without a key) is made again, and its one row is inserted if absent. On an empty
database they are created. Either way `budget_usd` becomes exact money like `usage.cost_usd`:
NUMERIC(21, 9) on Postgres (each float rounded to 9 places through its shortest decimal form), an
INTEGER of nano-dollars on SQLite (each float read as its shortest repr, so $0.3 is 300000000). A
budget above the largest a key may have (a billion USD: one stored before that cap) becomes the
cap, which is what it counted as already.
Frozen: later changes are later revisions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MONEY = sa.Numeric(21, 9).with_variant(sa.BigInteger(), "sqlite")  # ledger.schema.Money(21)'s storage
MAX_BUDGET_USD = Decimal(10**9)  # control.budgets.MAX_BUDGET_USD when this revision was written


def _key_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("secret_salt", sa.String(32), nullable=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("tasks", sa.JSON, nullable=False),
        sa.Column("providers", sa.JSON, nullable=True),
        sa.Column("requests_per_minute", sa.Integer),
        sa.Column("tokens_per_minute", sa.Integer),
        sa.Column("concurrent_requests", sa.Integer),
        sa.Column("budget_usd", MONEY, comment="USD per period, exact to the nano-dollar"),
        sa.Column("budget_period", sa.String(8)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    ]


def _version_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    ]


def _adopt_api_keys(inspector: sa.Inspector) -> None:
    """An api_keys table that the key store created: add what it lacks, make its budget exact."""
    have = {column["name"]: column for column in inspector.get_columns("api_keys")}
    for column in _key_columns():
        if column.name not in have:
            op.add_column("api_keys", column)
    budget = have.get("budget_usd")
    if budget is not None and isinstance(budget["type"], sa.Float):  # a float column of dollars
        _exact_budgets()


def _exact_budgets() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.alter_column(
            "api_keys",
            "budget_usd",
            type_=sa.Numeric(21, 9),
            postgresql_using=(  # (least() ignores a NULL: no budget must stay none)
                f"CASE WHEN budget_usd IS NULL THEN NULL ELSE round(least(budget_usd, {MAX_BUDGET_USD})::numeric, 9) END"
            ),
            comment="USD per period, exact to the nano-dollar",
        )
        return
    # Read first: the copy that changes the column's type CASTs each value (0.3 would become 0).
    rows = bind.execute(sa.text("SELECT id, budget_usd FROM api_keys WHERE budget_usd IS NOT NULL")).all()
    with op.batch_alter_table("api_keys", recreate="always") as batch:
        batch.alter_column("budget_usd", type_=sa.BigInteger(), comment="USD per period, exact to the nano-dollar")
    for key_id, dollars in rows:  # each in nano-dollars, from its shortest repr: $0.3 is 300000000
        amount = Decimal(repr(float(dollars))) if isinstance(dollars, float) else Decimal(dollars)
        amount = min(amount, MAX_BUDGET_USD)
        bind.execute(
            sa.text("UPDATE api_keys SET budget_usd = :nanos WHERE id = :id"),
            {"nanos": int(amount.scaleb(9).to_integral_value()), "id": key_id},
        )


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table("api_keys"):
        _adopt_api_keys(inspector)
    else:
        op.create_table("api_keys", *_key_columns())
    if inspector.has_table("key_version"):
        if "id" not in {column["name"] for column in inspector.get_columns("key_version")}:
            op.drop_table("key_version")  # the pre-release form: it only held a counter
            op.create_table("key_version", *_version_columns())
    else:
        op.create_table("key_version", *_version_columns())
    version = sa.table("key_version", sa.column("id", sa.Integer), sa.column("version", sa.Integer))
    if op.get_bind().execute(sa.select(sa.func.count()).select_from(version)).scalar_one() == 0:
        op.execute(version.insert().values(id=1, version=0))


def downgrade() -> None:
    """Back to budgets as float dollars; the tables stay (the key store of 0002 adopts them)."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.alter_column("api_keys", "budget_usd", type_=sa.Float())
        return
    with op.batch_alter_table("api_keys", recreate="always") as batch:
        batch.alter_column("budget_usd", type_=sa.Float())
    op.execute("UPDATE api_keys SET budget_usd = budget_usd / 1000000000.0 WHERE budget_usd IS NOT NULL")
