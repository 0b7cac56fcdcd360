"""The figures quoted in the "Exact against fast" tab are those of docs/benchmarks.md."""

from __future__ import annotations

from diffusers_mar.demo.quality import BENCHMARK_SECTION, COLUMNS, QUOTED, quality_table
from tests.testing_utils import REPO_ROOT


def benchmark_rows() -> dict[str, dict[str, str]]:
    """The table of the benchmark section: setting -> column -> cell."""
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    section = text[text.index(f"## {BENCHMARK_SECTION}\n") :]
    lines = [line for line in section.split("\n## ")[0].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:  # the separator line starts with "|-"
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells))
    return rows


def test_the_quoted_figures_are_those_of_docs_benchmarks():
    rows = benchmark_rows()
    for setting, cells in QUOTED.items():
        assert {column: rows[setting][column] for column in COLUMNS} == dict(zip(COLUMNS, cells)), setting


def test_the_table_shows_every_quoted_figure_and_where_it_comes_from():
    table = quality_table(measured_on_this_model=True)
    for setting, cells in QUOTED.items():
        assert f"| `{setting}` | " + " | ".join(cells) + " |" in table
    assert BENCHMARK_SECTION in table and "not on this one" not in table
    assert "measured on the shipped digits model, not on this one" in quality_table(measured_on_this_model=False)
