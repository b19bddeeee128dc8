"""A service that refuses its settings (exit 2: a weak admin token, an out-of-date Postgres ledger)
stops `meshserve up` with that code and the one-line reason, instead of being restarted forever."""

from __future__ import annotations

import pytest

from tests.helpers import start_mesh

pytestmark = pytest.mark.mesh


def test_a_gateway_that_refuses_its_settings_stops_meshserve_up(tmp_path):
    env = {"MESHSERVE_GATEWAY_AUTH": "true", "MESHSERVE_ADMIN_TOKEN": "changeme"}
    with pytest.raises(RuntimeError, match="meshserve up exited with 2") as refused:
        start_mesh(tmp_path, env, timeout_s=300)  # restarted forever: a TimeoutError instead
    log = str(refused.value)
    assert "refusing to start" in log and "gateway refused to start" in log
    assert "restarting in" not in log and "Traceback" not in log
