"""The README stays a short teaching page (at most 250 lines, no commit hashes) and no documentation link
is broken: histories, commit hashes, speed tables and deviations live in docs/, and every relative
link in README.md and docs/ reaches an existing file (and, for a `#anchor` into a markdown page, one
of its headings, slugged the way GitHub slugs them)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A git object name as people paste it: 7-40 lowercase hex characters standing alone, with at
# least one digit and one letter (so plain numbers such as 134975808 and words such as "decade"
# do not count). The README names commands, not commits: such a token belongs in docs/LOG.md.
HEX_WORD = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{7,40}(?![0-9A-Za-z])")


def prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield i, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores
    kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def links(path: Path):
    """(line number, target) of every markdown link and image outside code."""
    for i, line in prose_lines(path):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield i, m.group(1)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it at most {MAX_README_LINES} and move detail to docs/"


def test_readme_names_no_commits():
    found = [(i, w) for i, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1)
             for w in HEX_WORD.findall(line) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not found, f"README.md holds commit-hash-like words (history belongs in docs/LOG.md): {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for i, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{page.relative_to(ROOT)}:{i}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(ROOT)}:{i}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers on a hand-written page: a fenced link and a code-span link are not links, a
    heading's anchor is GitHub's, a hash-like word is found and a plain number is not."""
    page = tmp_path / "p.md"
    page.write_text("# The `familiar` source (x, y; a.py)\n## Step 1\n## Step 1\n"
                    "[ok](p.md#step-1-1) `[no](missing.md)`\n```\n[no](missing.md)\n```\n"
                    "![img](img/x.png)\n", encoding="utf-8")
    assert anchors(page) == {"the-familiar-source-x-y-apy", "step-1", "step-1-1"}
    assert [t for _, t in links(page)] == ["p.md#step-1-1", "img/x.png"]
    assert HEX_WORD.findall("at e859be0, 134975808 tokens, human-fb932e0fcaf2a7e7, 3e-3") == \
        ["e859be0", "134975808", "fb932e0fcaf2a7e7"]  # the digits-only word is dropped by the test
