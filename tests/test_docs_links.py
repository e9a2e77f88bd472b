"""Every relative link of the user's pages resolves: README.md, docs/*.md and benchmarks/README.md link only to
files that exist, and every #anchor names a heading of the page it points to (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; the text may hold inline code but no brackets.
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, everything but letters, digits, spaces,
    hyphens and underscores dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[`*]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a page's headings get (GitHub numbers repeats: x, x-1, x-2)."""
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", text)):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def links(text: str) -> list[str]:
    """The link targets of a page, code blocks and inline code left out."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` that does not resolve, with the reason."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_docs_pages_are_linked_from_readme():
    readme = links((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in readme if t.startswith("docs/")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == []


def test_the_checker_finds_planted_problems(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Two `words` here\n\n## Two words here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top: it's *this*\n\n"
        "[ok](other.md#two-words-here) [ok](other.md#two-words-here-1) [ok](#top-its-this) [web](https://x.y/z)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad local](#nowhere)\n"
        "`[in code](ignored.md)`\n\n```\n[in a block](ignored.md)\n```\n"
    )
    problems = broken_links(page)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "other.md#nope", "#nowhere"]


def test_slugs_follow_github():
    assert slug("Resuming and errors") == "resuming-and-errors"
    assert slug("The demo: a real pretrained model, offline") == "the-demo-a-real-pretrained-model-offline"
    assert slug("`--optim badam` with `--optim_args`") == "--optim-badam-with---optim_args"
    assert slug("Where we differ from the authors' `badam` package") == "where-we-differ-from-the-authors-badam-package"
