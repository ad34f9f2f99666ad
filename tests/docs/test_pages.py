"""Every generated block of README.md and docs/ says what its JSON file (or `reslab models`) says (issue 18).

A block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; benchmarks/docs_pages.py renders
each one anew, in memory, and compares. `make docs-pages` rewrites the stale ones.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import docs_pages  # noqa: E402  (benchmarks/ is scripts, not a package)


def marked_blocks() -> list[tuple[str, str]]:
    """(page, block name) for every generated block of every page."""
    return [
        (str(page.relative_to(ROOT)), name)
        for page in docs_pages.pages(ROOT)
        for name, _ in docs_pages.MARKER.findall(page.read_text())
    ]


@pytest.mark.parametrize(("page", "name"), marked_blocks())
def test_each_generated_block_says_what_its_source_says(page, name):
    """The model table (`reslab models --format markdown`), the explain summaries and every results table."""
    text = (ROOT / page).read_text()
    written = dict(docs_pages.MARKER.findall(text))[name]
    fresh = dict(docs_pages.MARKER.findall(docs_pages.regenerate(text, ROOT)))[name]
    assert written == fresh, f"{page}: the block {name!r} is stale; regenerate it with `make docs-pages`"


def test_every_renderer_has_its_block_on_a_page_and_nothing_is_stale():
    assert docs_pages.stale(ROOT) == []


def test_the_check_catches_a_number_edited_by_hand(tmp_path):
    """A copy of the site's sources with one number of one table changed: the check names that page and block."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "benchmarks/results", tmp_path / "benchmarks/results")
    shutil.copytree(
        ROOT / "src/reslab/explain/reference_nets",
        tmp_path / "src/reslab/explain/reference_nets",
        ignore=shutil.ignore_patterns("*.safetensors"),
    )
    page = tmp_path / "docs/results.md"
    text = page.read_text()
    assert "| 1,328.5 |" in text  # the default path's images/s in the throughput table
    page.write_text(text.replace("| 1,328.5 |", "| 1,428.5 |"))
    assert docs_pages.stale(tmp_path) == ["docs/results.md: throughput"]


def test_a_block_without_a_renderer_is_an_error():
    with pytest.raises(KeyError, match="no renderer for the block 'nonsense'"):
        docs_pages.regenerate("<!-- nonsense:start -->\nx\n<!-- nonsense:end -->\n", ROOT)
