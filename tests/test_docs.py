"""The front page stays a front page: README.md under 150 lines with the two set-up commands, and
every relative link in it and in docs/ points at a file (and a heading, for `page.md#anchor`) that
exists. Plain file reads only."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in HEADING.findall(text)}


def test_the_readme_is_short_and_names_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 150
    assert "scripts/demo.sh" in text and "scripts/test.sh" in text


def test_every_relative_link_points_at_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme_and_the_index() -> None:
    readme = (REPO / "README.md").read_text()
    index = (REPO / "docs" / "README.md").read_text()
    pages = [p.name for p in PAGES[1:] if p.name != "README.md"]
    assert [name for name in pages if f"(docs/{name}" not in readme] == []
    assert [name for name in pages if f"({name}" not in index] == []
