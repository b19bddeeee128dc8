"""The usage ledger: one row per request the gateway answered, queued without blocking, written by
a process of its own, read back as reports.

Modules: `schema` (the usage table and UsageRecord), `migrate` (the gateway database's Alembic
revisions, in `migrations/`: the usage table's, and from 0003 the API-key tables' too), `queue` (UsageLedger), `pipe` (the gateway's end of the writer process), `writer`
(the writer process and its idempotent insert), `reports` (UsageReports).
Other layers import from this package only (`from services.gateway.ledger import UsageLedger`).
"""

from services.gateway.ledger.migrate import LedgerSchemaError, ensure_schema
from services.gateway.ledger.pipe import LedgerWriteError
from services.gateway.ledger.queue import UsageLedger
from services.gateway.ledger.reports import Grouping, UsageReports
from services.gateway.ledger.schema import Money, UsageRecord, usage

__all__ = [
    "Grouping",
    "LedgerSchemaError",
    "LedgerWriteError",
    "Money",
    "UsageLedger",
    "UsageRecord",
    "UsageReports",
    "ensure_schema",
    "usage",
]
