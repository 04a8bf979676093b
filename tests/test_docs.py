"""The documentation holds together: README.md is a short front page, its layout table names files that
exist, and every relative link in README.md, docs/*.md and benchmarks/README.md reaches a file (and,
for `page.md#anchor`, a heading of that page), and every function or class docs/tour.md lists after a
"`file.py`:" is defined in that file (read with ast, not imported). Plain text parsing, no network,
well under a second."""

import ast
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


# ---- the tour names the code as it is -------------------------------------------------------------

TOUR = ROOT / "docs" / "tour.md"
# `file.py`: then a list of `names`, each maybe followed by a (parenthesis), separated by ", " or "and"
FILE_REF = re.compile(r"`([\w./-]+\.py)`:\s*")
NAME_ITEM = re.compile(r"`([^`]+)`")
SEPARATOR = re.compile(r",\s*(?:and\s+|or\s+)?|(?:and|or)\s+")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\)|\[.*\])?$")   # name, a.b, f(x=1), t[sft]


def tour_references(text: str) -> list[tuple[str, str]]:
    """(file, name) for each name listed right after a "`file.py`:" in the tour's prose and tables:
    backticked, separated by ", " or " and ", each maybe followed by a parenthesis, which is skipped
    (it holds config keys and notes). Items that are no Python name (`attn_type = "mla"`) are left out."""
    refs = []
    for line in prose_lines(text):
        for m in FILE_REF.finditer(line):
            i = m.end()
            while True:
                item = NAME_ITEM.match(line, i)
                if not item:
                    break
                name = DOTTED.match(item.group(1))
                if name:
                    refs.append((m.group(1), name.group(1)))
                i = item.end()
                while i < len(line) and line[i] == " ":
                    i += 1
                if line.startswith("(", i):   # skip a balanced parenthesis
                    depth = 0
                    for j in range(i, len(line)):
                        depth += {"(": 1, ")": -1}.get(line[j], 0)
                        if depth == 0:
                            break
                    i = j + 1
                sep = SEPARATOR.match(line, i)
                if not sep or not line.startswith("`", sep.end()):
                    break
                i = sep.end()
    return refs


def module_names(path: Path) -> dict[str, set[str] | None]:
    """A module's top-level names, read with ast: each class maps to its members (methods, class
    attributes and dataclass fields, self.x set in its methods, and those of base classes defined in
    the same file); other names map to None. Imported names do not count: the tour names the file
    that defines each one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def targets(node) -> list[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            ts = node.targets if isinstance(node, ast.Assign) else [node.target]
            return [n.id for t in ts for n in ast.walk(t) if isinstance(n, ast.Name)]
        if isinstance(node, (ast.If, ast.Try)):   # try: ... / except: x = None
            body = node.body + node.orelse + getattr(node, "finalbody", [])
            body += [s for h in getattr(node, "handlers", []) for s in h.body]
            return [n for s in body for n in targets(s)]
        return []

    names: dict[str, set[str] | None] = {}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in tree.body:
        for n in targets(node):
            names.setdefault(n, None)

    def members(cls: ast.ClassDef, seen=()) -> set[str]:
        out = {n for stmt in cls.body for n in targets(stmt)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
                out |= members(classes[base.id], (*seen, cls.name))
        return out

    for name, cls in classes.items():
        names[name] = members(cls)
    return names


def unresolved(refs: list[tuple[str, str]]) -> list[str]:
    missing, parsed = [], {}
    for file, name in refs:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file}: {name} (no such file)")
            continue
        names = parsed.setdefault(file, module_names(path))
        top, *rest = name.split(".")
        ok = top in names and (not rest or (len(rest) == 1 and names[top] is not None and rest[0] in names[top]))
        if not ok:
            missing.append(f"{file}: {name}")
    return missing


def test_tour_reference_parser():
    line = ("| x | `a.py`: `f`, `C.m` (`--run.x`, `g`), `h(k=1)`; `not_listed` | `tests/t.py`: `test_a[b]` "
            "and `test_c` | `b.py`: `key = 1`, `ok` | `c.py` (`skipped`) | `d.py`: `outer` (s (x) by `e.py`: "
            "`inner`), `after` |")
    assert tour_references(line) == [("a.py", "f"), ("a.py", "C.m"), ("a.py", "h"),
                                     ("tests/t.py", "test_a"), ("tests/t.py", "test_c"), ("b.py", "ok"),
                                     ("d.py", "outer"), ("d.py", "after"), ("e.py", "inner")]
    # a dataclass field, an inherited method, an attribute set in __init__ resolve
    assert not unresolved([("model.py", "ModelConfig.tie_embeddings"), ("attention.py", "StreamingKVCache.update"),
                           ("attention.py", "KVCache.recent"), ("tests/test_docs.py", "test_tour_names_resolve")])
    # an imported name, a missing member, a member of a function, a missing file do not
    assert unresolved([("sft.py", "chat_segments"), ("model.py", "ModelConfig.no_such_field"),
                       ("model.py", "count_params.x"), ("no_such_file.py", "f")]) == [
        "sft.py: chat_segments", "model.py: ModelConfig.no_such_field", "model.py: count_params.x",
        "no_such_file.py: f (no such file)"]


def test_tour_names_resolve():
    """Every name a tour cell lists after "`file.py`:" is defined in that file: a top-level def, class
    or assignment, or Class.member (method, attribute, dataclass field). Parsed, not imported."""
    refs = tour_references(TOUR.read_text(encoding="utf-8"))
    assert len(refs) > 100, f"the tour lists only {len(refs)} file: name references; did its format change?"
    missing = unresolved(refs)
    assert not missing, "docs/tour.md names what its file does not define:\n" + "\n".join(missing)
