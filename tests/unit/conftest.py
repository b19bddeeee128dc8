"""The unit tests on an interpreter without torch (CI's Python 3.13 leg, scripts/ci_py313.sh, where no
CPU torch build for 3.13 is reachable): with MESHSERVE_TORCHLESS_OK=1 and torch absent, a test module
whose import needs torch, or a test that fails because torch cannot be imported, is reported as
skipped, by name, instead of as an error. Anywhere else a missing module stays an error."""

from __future__ import annotations

import importlib.util
import os

import pytest

TORCHLESS = os.environ.get("MESHSERVE_TORCHLESS_OK") == "1" and importlib.util.find_spec("torch") is None
REASON = "needs torch, which this interpreter lacks"


def _wants_torch(excinfo) -> bool:
    return excinfo is not None and excinfo.errisinstance(ModuleNotFoundError) and excinfo.value.name == "torch"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if TORCHLESS and report.failed and "No module named 'torch'" in str(report.longrepr):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: {REASON}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if TORCHLESS and report.failed and _wants_torch(call.excinfo):
        path, line, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (path, (line or 0) + 1, f"Skipped: {REASON}")
    return report
