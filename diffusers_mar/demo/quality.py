"""The quality of the exact default and the presets, quoted from docs/benchmarks.md for the "Exact against fast" tab.

The figures were measured on the shipped digits model (`diffusers_mar.DEFAULT_MODEL`) by
`benchmarks/eval_fast_orders_digits.py`; `tests/demo/test_quality.py` checks that each quoted row is in
docs/benchmarks.md as written here, so the tab and the benchmarks cannot drift apart.
"""

from __future__ import annotations

BENCHMARK_SECTION = "Orders, step schedules and caches: shipped 16-token model"
COLUMNS = ("img/s (min-max)", "speed-up", "accuracy", "Fréchet (x floor)", "diversity")
# The setting column of the benchmark table -> the quoted cells (COLUMNS), as docs/benchmarks.md writes them.
QUOTED = {
    "default": ("26.5 (23.6-28.5)", "1.0x", "0.980", "0.233 (1.41x)", "0.968"),
    "preset=fast": ("305.0 (280.0-329.0)", "11.5x", "0.985", "0.210 (1.27x)", "0.933"),
    "preset=fast-ddpm": ("170.7 (156.7-178.5)", "6.4x", "0.988", "0.214 (1.30x)", "0.910"),
}


def quality_table(measured_on_this_model: bool) -> str:
    """The quoted rows as Markdown, with where they come from (and a warning when the model is another one)."""
    header = "| setting | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    rows = "".join(f"| `{setting}` | " + " | ".join(cells) + " |\n" for setting, cells in QUOTED.items())
    note = (
        f'Quoted from docs/benchmarks.md, "{BENCHMARK_SECTION}": 1,000 images per setting and seed (seeds 0 and 1), '
        "classifier accuracy, Fréchet distance to the real digits (floor 0.165) and diversity against the real data."
    )
    if not measured_on_this_model:
        note += " **They were measured on the shipped digits model, not on this one.**"
    return header + rows + "\n" + note
