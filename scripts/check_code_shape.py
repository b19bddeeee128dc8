#!/usr/bin/env python3
"""Fails when a function in services/ is longer than a screen: more than 60 lines from its `def`
to its last line, unless a `# long: <reason>` comment on the `def` line (or on a comment line just
above it or its decorators) says why it stays long. Run by `make lint` and `make test`.

    python scripts/check_code_shape.py [--max-lines N] [PATH ...]    # default: services
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
WAIVER = "# long:"


@dataclass(frozen=True)
class LongFunction:
    path: Path
    line: int
    name: str
    length: int
    max_lines: int

    def __str__(self) -> str:
        where = self.path.resolve().relative_to(ROOT) if self.path.resolve().is_relative_to(ROOT) else self.path
        return f"{where}:{self.line}: {self.name} is {self.length} lines (max {self.max_lines}, or '{WAIVER} why')"


def _waived(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """A waiver sits on the def line, on a decorator line, or on a comment line just above them
    (not on an enclosing function's def line: its waiver is its own)."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    above = lines[first - 2].strip() if first > 1 else ""
    return (above.startswith("#") and WAIVER in above) or any(
        WAIVER in lines[i - 1] for i in range(first, node.lineno + 1)
    )


def long_functions(path: Path, max_lines: int = MAX_LINES) -> Iterator[LongFunction]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > max_lines and not _waived(node, lines):
            yield LongFunction(path, node.lineno, node.name, length, max_lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[ROOT / "services"])
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    args = parser.parse_args(argv)
    files = sorted(f for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    found = sorted(
        (f for path in files for f in long_functions(path, args.max_lines)), key=lambda f: (str(f.path), f.line)
    )
    for function in found:
        print(function)
    if found:
        print(f"code shape: {len(found)} function(s) longer than {args.max_lines} lines", file=sys.stderr)
        return 1
    print(f"code shape: no function longer than {args.max_lines} lines in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
