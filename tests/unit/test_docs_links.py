"""The documentation's pointers lead somewhere.

Every relative link in the repository's Markdown files (README.md, docs/, the READMEs next to the
code) names a file that exists and, with a ``#fragment``, a heading of that file (anchors made as
GitHub makes them). Code, configs and comments that send the reader to ``docs/<page>.md`` (with or
without ``#anchor``) name a real page and heading too.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Hidden folders are tools' state (.git, .venv, .state, caches), except these.
VISIBLE_HIDDEN = {".ci", ".github"}
SKIPPED_DIRS = {"node_modules", "__pycache__"}
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".example", ".md", ".html"}
CODE_NAMES = {"Makefile", "Dockerfile", "run"}

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
# "docs/<page>.md" or "docs/<page>.md#<anchor>" as a repository path (not "../docs/…", not "my_docs/…").
DOCS_POINTER = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)(?:#([\w-]+))?")


def _walk(suffix_ok) -> list[Path]:
    found: list[Path] = []

    def visit(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                hidden = entry.name.startswith(".") and entry.name not in VISIBLE_HIDDEN
                if not hidden and entry.name not in SKIPPED_DIRS and not entry.name.endswith(".egg-info"):
                    visit(entry)
            elif entry.is_file() and suffix_ok(entry):
                found.append(entry)

    visit(REPO_ROOT)
    return found


def markdown_files() -> list[Path]:
    return _walk(lambda p: p.suffix == ".md")


def _prose_lines(text: str):
    """(line number, line without code spans) for the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and markup dropped, lower case, punctuation
    other than ``-`` and ``_`` removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    result: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        result.update(HTML_ANCHOR.findall(line))
        if match := HEADING.match(line):
            base = slug(match.group(2))
            result.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return result


def _check(source: Path, target: Path, fragment: str | None) -> str | None:
    shown = target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target
    if not target.exists():
        return f"{shown} does not exist"
    if fragment:
        if target.is_dir() or target.suffix != ".md":
            return f"#{fragment} points into {shown}, which is not a Markdown file"
        if fragment not in anchors(target):
            return f"{shown} has no heading with anchor #{fragment}"
    return None


def test_slug_matches_github() -> None:
    assert slug("Data layout (bucket `ct-data`)") == "data-layout-bucket-ct-data"
    assert slug("`drift_monitor` (dags/drift_monitor.py)") == "drift_monitor-dagsdrift_monitorpy"
    assert (
        slug("Reports: built from untrusted text, never run it")
        == "reports-built-from-untrusted-text-never-run-it"
    )
    assert slug("The demo, end to end") == "the-demo-end-to-end"


def test_the_docs_are_found() -> None:
    names = {p.relative_to(REPO_ROOT).as_posix() for p in markdown_files()}
    assert "README.md" in names
    assert any(name.startswith("docs/") for name in names), names


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    problems = []
    for number, line in _prose_lines(doc.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, …
                continue
            path_part, _, fragment = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if problem := _check(doc, resolved, fragment or None):
                problems.append(f"{doc.relative_to(REPO_ROOT)}:{number}: [{target}]: {problem}")
    assert not problems, "dead links:\n" + "\n".join(problems)


def test_pointers_into_docs_resolve() -> None:
    """``docs/<page>.md[#anchor]`` in code, configs, comments and DAG docs names a real heading."""
    files = _walk(lambda p: p.suffix in CODE_SUFFIXES or p.name in CODE_NAMES)
    problems = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for page, fragment in DOCS_POINTER.findall(line):
                if problem := _check(path, REPO_ROOT / "docs" / page, fragment or None):
                    problems.append(f"{path.relative_to(REPO_ROOT)}:{number}: docs/{page}: {problem}")
    assert not problems, "dead pointers into docs/:\n" + "\n".join(problems)
