"""`benchmarks/benchmarking_utils.py`, the one module the benchmark scripts share: the timer, the docs writer, the
recorded command, the machine line; and the rule that no script imports another script."""

from __future__ import annotations

import ast
import os
import stat
import time

import pytest

from benchmarks.benchmarking_utils import (
    Timer,
    format_spread,
    interleaved,
    machine_description,
    public_argv,
    section_markers,
    spread,
    update_docs_section,
    update_titled_section,
)
from tests.testing_utils import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
PREFIXES = ("bench_", "eval_", "figure_")  # speed, quality, pictures


def test_a_timed_call_gives_its_sections_and_result():
    timer = Timer()

    def call():
        with_sleep = timer.wrap("inner", time.sleep)
        with_sleep(0.02)
        return "done"

    totals, result = timer.time(call)
    assert result == "done" and set(totals) == {"total", "inner"}
    assert 0.02 <= totals["inner"] <= totals["total"]
    totals, _ = timer.time(lambda: None)  # each call is timed alone
    assert set(totals) == {"total"}


def test_rounds_interleave_the_calls_and_time_each_alone():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in ("a", "b", "c")}
    rounds = list(interleaved(calls, repeats=3))
    assert order == ["a", "b", "c"] * 3
    assert len(rounds) == 3 and all(list(r) == ["a", "b", "c"] for r in rounds)
    assert all(r[name][1] == name and r[name][0]["total"] >= 0 for r in rounds for name in r)


def test_spread_is_median_min_max():
    stats = spread([3.0, 1.0, 2.0, 10.0])
    assert stats == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": 4}
    assert format_spread(stats, 1) == "2.5 (1.0-10.0)"


def test_docs_sections_are_replaced_in_place_and_others_kept(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Speed\n\nfast\n")
    update_titled_section(path, "Digits quality", "table v1")
    update_docs_section("## Sampling\n\nrow v1\n", section_markers("bench_sampling"), path)
    update_titled_section(path, "Other model", "other table")
    update_titled_section(path, "Digits quality", "table v2")
    update_docs_section("## Sampling\n\nrow v2\n", section_markers("bench_sampling"), path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\n## Speed\n\nfast\n")
    assert "table v2" in text and "table v1" not in text and "other table" in text
    assert "row v2" in text and "row v1" not in text
    assert text.count("## Digits quality") == 1 and text.count("<!-- bench_sampling:begin -->") == 1
    assert text.index("Digits quality") < text.index("Sampling") < text.index("Other model")  # in place
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # written atomically, a plain file's permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks.md"]


def test_recorded_command_names_no_path_of_this_machine():
    argv = ["--original-repo", "/tmp/LTH14-mar", "--batch-sizes", "1", "--original-repo=/home/me/mar"]
    shown = public_argv(argv)
    assert shown == ["--original-repo", "path/to/LTH14-mar", "--batch-sizes", "1", "--original-repo=path/to/LTH14-mar"]
    assert argv[1] == "/tmp/LTH14-mar"  # the caller's list is left alone
    other = ["--output-json", "/tmp/run/x.json", "--model=/data/digits64/", "--grid", "grid.png", "--seeds", "0"]
    assert public_argv(other) == ["--output-json", "x.json", "--model=digits64", "--grid", "grid.png", "--seeds", "0"]


def test_machine_description_names_the_threads_and_dtype():
    text = machine_description(threads=3)
    assert "torch threads 3" in text and "float32" in text and f"{os.cpu_count()} logical CPUs" in text


def _scripts() -> list:
    return sorted(
        path for path in BENCHMARKS.glob("*.py") if path.name not in ("__init__.py", "benchmarking_utils.py")
    )


def test_scripts_follow_the_naming_scheme():
    assert _scripts()
    assert [path.name for path in _scripts() if not path.name.startswith(PREFIXES)] == []


@pytest.mark.parametrize("path", _scripts(), ids=lambda path: path.name)
def test_no_script_imports_another_script(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module if node.module != "benchmarks" else f"benchmarks.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {name for name in imported if name.startswith("benchmarks")} <= {"benchmarks.benchmarking_utils"}
