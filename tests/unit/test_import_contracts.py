"""The dependency rules of ARCHITECTURE §2 as import-linter contracts (.importlinter): the real tree
keeps them, and a deliberately wrong import in a copy of the tree breaks the contract it should,
through the same `lint-imports` command that `make lint` and `make test` run."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.settings import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = ".importlinter"

# The contracts that the tree keeps today; the gateway's layers contract is left out while the
# gateway is being split into its layers (make lint runs every contract).
SETTLED = ["services-independent", "common-below-services", "launcher-on-top", "deploy-imports-common-only"]


def contract_name(contract: str) -> str:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / CONFIG)
    return config[f"importlinter:contract:{contract}"]["name"]


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at `root`: its packages first on the path, so the copy is read."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "gen")]), "COLUMNS": "200"}
    selected = [arg for contract in contracts for arg in ("--contract", contract)]
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", *selected, CONFIG],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the code that the contracts cover, with the contracts."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("services", "deploy", "gen"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder, ignore=ignore)
    shutil.copy(REPO_ROOT / CONFIG, tmp_path / CONFIG)
    return tmp_path


def test_the_tree_keeps_the_settled_contracts():
    result = lint_imports(REPO_ROOT, *SETTLED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(SETTLED)} kept, 0 broken." in result.stdout


# (the module that gets the wrong import, the import, the contract it breaks)
WRONG_IMPORTS = {
    "common-imports-gateway": ("services/common/deadlines.py", "services.gateway.settings", "common-below-services"),
    "common-imports-models": ("services/common/deadlines.py", "services.models.build", "common-below-services"),
    "service-imports-service": ("services/preprocess/settings.py", "services.postprocess.settings", "services-independent"),
    "deploy-imports-service": ("deploy/k8s/triton_repository.py", "services.inference.settings", "deploy-imports-common-only"),
    "service-imports-launcher": ("services/inference/settings.py", "services.cli", "launcher-on-top"),
    "pipeline-imports-api": ("services/gateway/pipeline/cache.py", "services.gateway.api.http_app", "gateway-layers"),
}  # fmt: skip


@pytest.mark.parametrize(("module", "wrong_import", "broken"), WRONG_IMPORTS.values(), ids=WRONG_IMPORTS.keys())
def test_a_wrong_import_breaks_its_contract(tree, module, wrong_import, broken):
    path = tree / module
    path.write_text(path.read_text() + f"\nimport {wrong_import}  # deliberately wrong\n")
    result = lint_imports(tree, *(SETTLED if broken in SETTLED else [broken]))
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert f"{contract_name(broken)} BROKEN" in output, output
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {wrong_import}" in output, output


def test_make_lint_and_make_test_run_the_contracts_and_the_shape_check():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "LINT_IMPORTS := $(VENV)/bin/lint-imports --no-logo --no-cache .importlinter" in makefile
    for target in ("lint", "test"):
        recipe = makefile.split(f"\n{target}: ", 1)[1].split("\n\n", 1)[0]
        assert "\t$(LINT_IMPORTS)\n" in recipe and "\t$(CODE_SHAPE)" in recipe, target
