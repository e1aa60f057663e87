"""The README stays the first five minutes: short, with the two commands CI and a newcomer use, and an
index that reaches every page of docs/."""

from __future__ import annotations

import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


def test_the_readme_gives_the_two_commands():
    # .ci/run calls `make test`; a newcomer starts with `make serve`.
    for command in ("make serve", "make test"):
        assert re.search(rf"^{command}\s+#", README, re.M), command


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", README))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, sorted(pages - linked)
