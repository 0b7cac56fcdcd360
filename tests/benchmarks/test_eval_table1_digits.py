"""`benchmarks/eval_table1_digits.py`: the seeds' summary (mean and min-max), each variant's sampler, and (slow) a
tiny end-to-end run of an AR and a VAR variant with validation curves and the speed table."""

from __future__ import annotations

import json

import pytest

from benchmarks import eval_table1_digits as table1
from benchmarks.benchmarking_utils import titled_section_markers


def row(variant, seed, accuracy, guidance=1.5, tokens=16):
    return {
        "tokens": tokens, "variant": variant, "seed": seed, "guidance": guidance, "accuracy": accuracy,
        "frechet_distance": 1.0 + seed, "diversity_ratio": 1.0, "images_per_second": 10.0 * (seed + 1),
        "validation_loss": 0.1 * (seed + 1), "parameters": 1000, "train_seconds": 100.0 + seed,
    }  # fmt: skip


def test_the_summary_is_the_mean_and_range_over_seeds_in_the_variants_order():
    rows = [row("var", 0, 0.5), row("ar-raster", 0, 0.9), row("ar-raster", 1, 0.7), row("ar-raster", 2, 0.8)]
    lines = table1.summary(rows)
    assert [(line["variant"], line["seeds"]) for line in lines] == [("ar-raster", 3), ("var", 1)]
    assert lines[0]["accuracy"] == pytest.approx((0.8, 0.7, 0.9))
    assert lines[0]["frechet_distance"] == pytest.approx((2.0, 1.0, 3.0))
    assert lines[0]["train_seconds"] == pytest.approx(101.0)
    assert table1.format_stat((0.8, 0.7, 0.9)) == "0.800 (0.700-0.900)"


def test_each_trained_model_gives_its_rows_samplers():
    assert table1.samplers("mar", 64) == {
        "mar-1-per-step": {"num_inference_steps": 64},
        "mar-few": {"num_inference_steps": 16},
    }
    assert table1.samplers("ar-random", 16) == {"ar-random": {"order": "random"}}
    assert table1.samplers("ar-anneal", 16) == {"ar-anneal": {"order": "raster"}}  # trained to end on raster
    assert table1.samplers("var", 16) == {"var": {}}


def test_earlier_rows_fill_only_the_models_the_run_lacks(tmp_path):
    earlier = [
        {**row("ar-raster", 0, 0.9), "trained": "ar-raster"},
        {**row("ar-raster", 1, 0.8), "trained": "ar-raster"},
        {**row("mar-few", 0, 0.7), "trained": "mar"},
    ]
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    have = [{**row("ar-raster", 1, 0.5), "trained": "ar-raster"}]
    assert table1.earlier_rows(path, have) == [earlier[0], earlier[2]]
    assert table1.earlier_rows(None, have) == []
    with pytest.raises(SystemExit, match="--results-from: no such file"):
        table1.earlier_rows(tmp_path / "missing.json", have)


def test_report_only_reports_the_earlier_rows_and_keeps_the_speed_section(tmp_path, capsys, monkeypatch):
    earlier = [{**row("ar-raster", seed, 0.9 - seed / 10), "trained": "ar-raster"} for seed in (0, 1, 2)]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    docs = tmp_path / "benchmarks.md"
    start, end = titled_section_markers(table1.SPEED_SECTION)
    docs.write_text(f"# Benchmarks\n\n{start}\n## {table1.SPEED_SECTION}\n\nmeasured speeds\n{end}\n")
    monkeypatch.setattr(table1, "DOCS_PATH", docs)
    argv = ["--output-root", str(tmp_path / "root"), "--report-only", "--write-docs"]
    assert table1.main([*argv, "--results-from", str(tmp_path / "earlier.json")]) == 0
    line = "| 16 | ar-raster | 3 | 1,000 | 1.5 | 0.800 (0.700-0.900) |"
    assert line in capsys.readouterr().out
    text = docs.read_text()
    assert line in text and f"## {table1.SECTION}" in text
    assert "measured speeds" in text  # no --speed-repeats: the speed section is left as it was


@pytest.mark.slow
def test_a_tiny_run_of_ar_and_var_with_curves_and_speed(tmp_path):
    argv = [
        "--output-root", str(tmp_path), "--patch-sizes", "2", "--seeds", "0", "--variants", "ar-raster", "var",
        "--steps", "4", "--tokenizer-steps", "4", "--num-per-class", "2", "--num-diffusion-steps", "2",
        "--validation-points", "2", "--speed-repeats", "1", "--curves", str(tmp_path / "curves.png"),
    ]  # fmt: skip
    assert table1.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert sorted({(r["variant"], r["guidance"]) for r in rows}) == [
        ("ar-raster", 1.0), ("ar-raster", 1.5), ("var", 1.0), ("var", 1.5)
    ]  # fmt: skip
    assert all(r["best_step"] in (2, 4) and 0 <= r["accuracy"] <= 1 and r["images_per_second"] > 0 for r in rows)
    curve = json.loads((tmp_path / "p2-s0-var" / "validation_loss.json").read_text())
    assert [entry["step"] for entry in curve] == [2, 4]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "speed.json").read_text())) == {"16 ar-raster", "16 var"}
    # A second call reuses the trained folders and the evaluations: nothing new is added.
    assert table1.main(argv) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(rows)
