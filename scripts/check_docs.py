#!/usr/bin/env python3
"""Check the links of the project's Markdown: every relative link and image in README.md and docs/**/*.md
must name a file or folder of the repository, and every #anchor a heading of its target page (GitHub's
slug rules). Web links are not fetched: the check needs no network.

    scripts/check_docs.py            # README.md and docs/, exit 1 with one line per broken link
    scripts/check_docs.py FILE...    # only these files
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <bracketed> and may carry a "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]*)\"", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def default_pages(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode: letters, digits and '_' stay
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings make, duplicates numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image of a page, code excluded."""
    found = []
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)  # `[a](b)` in code is no link
        for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK):
            for match in pattern.finditer(line):
                target = match.group(1).strip()
                if target.startswith("<") and target.endswith(">"):
                    target = target[1:-1]
                found.append((number, target))
    return found


def broken_link(page: Path, target: str, root: Path) -> str | None:
    """Why a link of `page` does not resolve, or None when it does (web links are not checked)."""
    if not target:
        return "empty link"
    if EXTERNAL.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if not path_part:
        destination = page
    elif path_part.startswith("/"):
        destination = (root / path_part.lstrip("/")).resolve()
    else:
        destination = (page.parent / path_part).resolve()
    if not destination.is_relative_to(root.resolve()):
        return f"{target}: outside the repository"
    if not destination.exists():
        return f"{target}: no such file"
    if anchor and destination.suffix.lower() == ".md" and destination.is_file():
        if unquote(anchor).lower() not in anchors(destination):
            return f"{target}: no heading makes #{anchor} in {destination.relative_to(root.resolve())}"
    return None


def check(pages: list[Path], root: Path = ROOT) -> list[str]:
    """One line per broken link: 'page:line: why'."""
    problems = []
    for page in pages:
        for number, target in links(page):
            why = broken_link(page.resolve(), target, root)
            if why:
                problems.append(f"{page.relative_to(root) if page.is_relative_to(root) else page}:{number}: {why}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Markdown files (default: README.md and docs/)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root links must stay in")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    pages = [p.resolve() for p in args.pages] or default_pages(root)
    problems = check(pages, root)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} broken link(s) in {len(pages)} page(s)", file=sys.stderr)
        return 1
    print(f"docs links: {len(pages)} page(s), every relative link resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
