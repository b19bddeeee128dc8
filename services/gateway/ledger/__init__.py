"""The usage ledger: row schema, write queue, writer process, reports.

Other layers import from this package only (`from services.gateway.ledger import UsageLedger`).
"""

from services.gateway.ledger.usage import UsageLedger, UsageRecord, create_usage_table, usage
from services.gateway.ledger.writer import LedgerWriteError

__all__ = ["LedgerWriteError", "UsageLedger", "UsageRecord", "create_usage_table", "usage"]
