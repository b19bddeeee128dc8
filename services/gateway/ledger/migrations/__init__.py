"""The usage ledger's Alembic migrations (env.py, versions/), run by `ledger.migrate` (the gateway's
start-up check, `meshserve db upgrade`). A package, so that `pip install .` ships them."""
