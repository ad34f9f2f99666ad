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


# Decimals in the understanding pages' prose that no result file holds, each with what it is. Every other decimal
# there must stand in one of the page's generated blocks, so that prose quoting a result cannot drift from it.
NOT_RESULTS = {
    "block.md": {"3.1", "3.2"},  # section numbers of the paper
    "degradation.md": (
        {"1.5", "0.5"}  # probe lengths of earlier runs (seconds; % of the budget)
        | {"8.88", "0.40", "3.4"}  # an earlier run's plain gap, the CPU twins' epochs: console output, said so
        | {"0.1", "0.9", "0.05"}  # the recipe's lr and momentum, the experiment's val_ratio
        | {"11.9", "17.9"}  # the issue's own measurement, quoted as such
    ),
    "index.md": {"0.5"},  # a gradient norm that tests/models/test_gradient_flow.py checks, cited there
    "responses.md": {"10.4", "3.4", "0.009", "4.2"},  # twins' epochs, an earlier run (said so), a paper section
}
DECIMAL = r"(?<![\w.])\d[\d,]*\.\d+"


def prose_numbers_not_in_blocks(page: Path) -> set[str]:
    """The decimals of ``page`` outside its generated blocks and code that none of its blocks contains."""
    import re

    text = page.read_text()
    blocks = " ".join(body for _, body in docs_pages.MARKER.findall(text))
    prose = re.sub(r"```.*?```", "", docs_pages.MARKER.sub("", text), flags=re.S)
    return {number for number in re.findall(DECIMAL, prose) if number not in blocks}


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs" / "understanding").glob("*.md")))
def test_the_understanding_pages_quote_only_numbers_their_blocks_hold(page, tmp_path):
    path = ROOT / "docs" / "understanding" / page
    assert prose_numbers_not_in_blocks(path) <= NOT_RESULTS.get(page, set())
    if "10.44" in path.read_text():  # a result quoted in prose, edited by hand, is caught
        edited = tmp_path / page
        edited.write_text(path.read_text().replace("plain-56 ends 10.44", "plain-56 ends 10.54"))
        assert "10.54" in prose_numbers_not_in_blocks(edited)
