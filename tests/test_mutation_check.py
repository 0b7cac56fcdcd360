"""The mutation list of `tests/mutation_check.py` stays valid as the code moves, and the check tells a caught
mutation from a surviving one."""

from __future__ import annotations

import pytest

from tests.mutation_check import MUTATIONS, Mutation, check_mutations, run_mutation

SCHEDULER = "diffusers_mar/schedulers/scheduling_ddpm_mar.py"
SCHEDULER_TESTS = ("tests/schedulers/test_scheduler_ddpm_mar.py",)


def test_every_mutation_names_a_line_found_once_and_existing_tests():
    assert check_mutations(MUTATIONS) == []


def test_the_list_covers_the_areas_the_suite_must_guard():
    names = {m.name for m in MUTATIONS}
    required = {
        "guidance-direction", "ar-guidance-halves", "guidance-linear-schedule", "mask-schedule-cosine",
        "skeleton-schedule", "scheduler-temperature", "scheduler-learned-variance", "kv-cache-position",
        "raster-order", "fid-cross-term", "inception-score-marginal", "precision-ball-radius", "ema-first-step",
        "lr-warmup", "converter-modulation-block-order", "inpaint-keep-mask",
    }  # fmt: skip
    assert required <= names


def test_check_mutations_reports_a_stale_list():
    stale = [
        Mutation("gone", SCHEDULER, "a line that is not there", "x", SCHEDULER_TESTS),
        Mutation("twice", SCHEDULER, "channels", "x", ("tests/no_such_test.py",)),
        Mutation("twice", SCHEDULER, "def add_noise(", "def add_noise(", SCHEDULER_TESTS),
        Mutation("no-test", SCHEDULER, "def add_noise(", "def q_sample(", (f"{SCHEDULER_TESTS[0]}::test_nothing",)),
    ]
    assert check_mutations(stale) == [
        f"gone: {SCHEDULER} holds the line 0 times, not once",
        f"twice: {SCHEDULER} holds the line {(_count(SCHEDULER, 'channels'))} times, not once",
        "twice: no test path tests/no_such_test.py",
        "twice: the name is used twice",
        "twice: the mutation changes nothing",
        f"no-test: {SCHEDULER_TESTS[0]} has no test test_nothing",
    ]


def _count(path: str, text: str) -> int:
    from tests.mutation_check import REPO_ROOT

    return (REPO_ROOT / path).read_text().count(text)


def test_a_line_gone_since_the_list_was_read_is_an_error_not_a_survivor():
    gone = Mutation("gone", SCHEDULER, "a line that is not there", "x", SCHEDULER_TESTS)
    outcome, _, output = run_mutation(gone, timeout=60)
    assert (outcome, output) == ("error", f"{SCHEDULER} holds the line 0 times")


@pytest.mark.slow
def test_a_real_mutation_is_caught_and_a_harmless_one_survives():
    temperature = next(m for m in MUTATIONS if m.name == "scheduler-temperature")
    outcome, _, output = run_mutation(temperature, timeout=900)
    assert outcome == "caught", output
    harmless = Mutation(
        "comment", SCHEDULER, "# As in LTH14/mar gaussian_diffusion.py", "# As in the original", SCHEDULER_TESTS
    )
    outcome, _, output = run_mutation(harmless, timeout=900)
    assert outcome == "survived", output
