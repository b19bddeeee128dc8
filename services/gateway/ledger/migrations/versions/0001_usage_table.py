"""The usage table as the releases before migrations made it (cost a float, request_id not unique).

On a database of such a release, whose table exists without a revision, it adds the columns and
indexes that an even older release's table lacks, as those releases did at start-up; on an empty
database it creates the table. Frozen: later changes are later revisions.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=True, comment="API key id (never the token); NULL: auth off"),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("route", sa.String(256), nullable=False, server_default=""),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("compute_s", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("status", sa.Integer, nullable=False, comment="HTTP status the caller got"),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False, comment="when the request started (UTC)"),
        sa.Column(
            "client_request_id",
            sa.String(128),
            nullable=True,
            comment="the caller's X-Request-Id (not unique, not trusted)",
        ),
        sa.Column(
            "attempts",
            sa.Integer,
            nullable=False,
            server_default=sa.text("1"),
            comment="providers tried for the request (1: the first answered)",
        ),
        sa.Column("upstream_request_id", sa.String(128), nullable=True, comment="the answering provider's request id"),
    ]


INDEXES = {"ix_usage_key_id_time": ["key_id", "time"], "ix_usage_time": ["time"]}


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("usage"):
        op.create_table("usage", *_columns())
        have_indexes: set[str] = set()
    else:
        have = {column["name"] for column in inspector.get_columns("usage")}
        for column in _columns():
            if column.name not in have:
                op.add_column("usage", column)
        have_indexes = {index["name"] for index in inspector.get_indexes("usage")}
    for name, columns in INDEXES.items():
        if name not in have_indexes:
            op.create_index(name, "usage", columns)


def downgrade() -> None:
    op.drop_table("usage")
