"""The usage ledger: row schema, write queue, writer process, reports."""
