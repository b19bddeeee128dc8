"""scripts/check_code_shape.py: a function in services/ longer than 60 lines fails the check unless a
`# long:` comment at its def says why; the violators are named with file:line and length."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from services.common.settings import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "check_code_shape.py"


def function(name: str, lines: int, above: str = "", at_def: str = "") -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    return f"{above}def {name}():{at_def}\n{body}    return 0\n\n\n"


def check(*paths) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_function_over_60_lines_fails_with_its_place_and_length(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(function("fits", 60) + function("too_long", 61))
    result = check(tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{module}:63: too_long is 61 lines (max 60, or '# long: why')"]


def test_a_long_comment_at_the_def_or_above_it_waives_the_limit(tmp_path):
    decorated = "@staticmethod\n"
    (tmp_path / "module.py").write_text(
        function("at_def", 90, at_def="  # long: one table, read top to bottom")
        + function("above", 90, above="# long: a generated dispatch\n")
        + function("above_decorators", 90, above="# long: the state machine reads as one\n" + decorated)
    )
    result = check(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "no function longer than 60 lines in 1 files" in result.stdout


def test_nested_and_async_functions_are_measured_too(tmp_path):
    inner = textwrap.indent(function("inner", 70).replace("def ", "async def "), "    ")
    (tmp_path / "module.py").write_text(f"def outer():  # long: holds the inner one\n{inner}    return inner\n")
    result = check(tmp_path / "module.py")
    assert result.returncode == 1
    assert "inner is 70 lines" in result.stdout and "outer" not in result.stdout
