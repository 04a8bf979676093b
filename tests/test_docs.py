"""The documentation holds together: README.md is a short front page, its layout table names files that
exist, and every relative link in README.md, docs/*.md and benchmarks/README.md reaches a file (and,
for `page.md#anchor`, a heading of that page). Plain text parsing, no network, well under a second."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) or [text](target "title"); images ![alt](target) too. The text may hold `code`.
LINK = re.compile(r"!?\[(?:[^\[\]]|`[^`]*`)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '#' in a bash block is not a heading, nor a link)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lowercase, punctuation other than '-' and '_'
    dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("``", line)   # `[a](b)` in inline code is code, not a link
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):   # http:, https:, mailto:
                continue
            targets.append(target)
    return targets


def test_slug_follows_githubs_rule():
    assert slug("Tour: the playbook, chapter by chapter") == "tour-the-playbook-chapter-by-chapter"
    assert slug("Two GPUs (FSDP2)") == "two-gpus-fsdp2"
    assert slug("The `gpu` tests") == "the-gpu-tests"
    assert slug("Training the tiny model (command 1)") == "training-the-tiny-model-command-1"
    assert slug("2026-11-23, 1x H100: how the code got there") == "2026-11-23-1x-h100-how-the-code-got-there"
    assert slug("snake_case and kebab-case") == "snake_case-and-kebab-case"


def test_pages_exist():
    for page in PAGES:
        assert page.is_file(), page.relative_to(ROOT)
    assert len(PAGES) > 3, "docs/ holds no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < 250, f"README.md has {n} lines; move detail into docs/"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page for: {missing}"


def test_layout_table_names_existing_files():
    lines = prose_lines(README.read_text(encoding="utf-8"))
    start = next(i for i, line in enumerate(lines) if re.match(r"^##\s+Layout\s*$", line))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            rows.append(line)
    named = [name for row in rows[1:] for name in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert any(name.endswith(".py") for name in named), "the layout table names no .py file"
    missing = [name for name in named if not (ROOT / name).exists()]
    assert not missing, f"README.md's layout table names missing paths: {missing}"
    # and every path.py the table mentions in its second column
    mentioned = {m for row in rows for m in re.findall(r"`([\w./-]+\.py)`", row)}
    assert not [m for m in mentioned if not (ROOT / m).exists()]
