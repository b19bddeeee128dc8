"""The docs stay true: every relative link of README.md and docs/ resolves, the README stays short and
names the test command, and the configuration reference matches the settings classes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


check_docs = _script("check_docs")
gen_config_docs = _script("gen_config_docs")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Set `MESHSERVE_HOME` up!\n\n## Notes\n\n## Notes\n")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG")
    return tmp_path


def test_every_link_of_the_repository_docs_resolves():
    assert check_docs.check(check_docs.default_pages(ROOT), ROOT) == []


def test_a_link_to_a_missing_file_fails_the_check(site: Path):
    page = site / "README.md"
    page.write_text("See [the guide](docs/guide.md) and [gone](docs/missing.md).\n")
    problems = check_docs.check([page], site)
    assert problems == ["README.md:1: docs/missing.md: no such file"]
    assert check_docs.main(["--root", str(site), str(page)]) == 1


def test_an_anchor_no_heading_makes_fails_the_check(site: Path):
    page = site / "README.md"
    page.write_text(
        "[ok](docs/guide.md#set-meshserve_home-up) [dup](docs/guide.md#notes-1) [self](#top)\n"
        "[bad](docs/guide.md#setup)\n\n# Top\n"
    )
    problems = check_docs.check([page], site)
    assert len(problems) == 1 and "README.md:2:" in problems[0] and "#setup" in problems[0]


def test_a_missing_image_and_a_link_outside_the_repository_fail(site: Path):
    page = site / "docs" / "page.md"
    page.write_text("![plot](../plot.png) ![gone](../missing.png) [up](../../elsewhere.md)\n")
    problems = check_docs.check([page], site)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../missing.png: no such file",
        "../../elsewhere.md: outside the repository",
    ]


def test_web_links_and_code_are_not_checked(site: Path):
    page = site / "README.md"
    page.write_text(
        "[web](https://example.com/x) <http://localhost:16686> `[code](nowhere.md)`\n\n"
        "```\n[in a fence](nowhere.md)\n```\n"
    )
    assert check_docs.check([page], site) == []
    assert check_docs.main(["--root", str(site), str(page)]) == 0


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Soak: `bench/run_soak.py`", "soak-benchrun_soakpy"),
        ("Authentication, limits, budgets and usage", "authentication-limits-budgets-and-usage"),
        ("Generation (chat and completions)", "generation-chat-and-completions"),
        ("Supervisor (`meshserve up`)", "supervisor-meshserve-up"),
        ("Between the services: the service token", "between-the-services-the-service-token"),
    ],
)
def test_anchors_follow_githubs_slug_rules(heading: str, anchor: str):
    assert check_docs.slug(heading) == anchor


def test_the_readme_reads_in_minutes_and_names_the_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "make test" in readme and "make up" in readme  # CI's .ci/run calls `make test`


def test_the_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen_config_docs.render(), "run .venv/bin/python scripts/gen_config_docs.py"
    assert gen_config_docs.main(["--check"]) == 0


def test_every_setting_has_a_description():
    assert gen_config_docs.undocumented() == []


def test_the_reference_names_each_variable_the_environment_sets():
    text = gen_config_docs.render()
    for variable in (
        "MESHSERVE_HOME",
        "MESHSERVE_GATEWAY_REDIS_URL",
        "MESHSERVE_ADMIN_TOKEN",
        "MESHSERVE_INFERENCE_BACKEND",
        "MESHSERVE_PREPROCESS_MAX_MESSAGE_BYTES",
        "MESHSERVE_SUPERVISOR_REPLICAS",
    ):
        assert f"`{variable}`" in text
    assert str(ROOT) not in text  # machine-independent: the catalog default is relative to the repository
