"""Sampling speed of two commits side by side: did a refactor change it?

Each commit is exported (`git archive`) into a temporary folder; `--repeats` rounds then run one fresh worker
process per commit, alternating which goes first, so that both see the same machine load. A worker loads the model
from its own tree (`benchmarks.benchmarking_utils.load_preset_or_folder`: a preset with random weights seeded the same
way in both, or a pipeline folder), makes `--warmup` untimed calls and times `--calls` calls with a fixed generator
(their median is the worker's time). Reported: seconds per call of each commit, median (min-max) over the rounds,
and the ratio after / before of each round. `--after .` (the default) is the working tree. Usage, from the
repository root:

    python benchmarks/bench_commits.py --before HEAD~1 --model shipped --batch-size 10 --calls 5 --repeats 5
    python benchmarks/bench_commits.py --before 3e9a3ed^1 --after 3e9a3ed --model mar-base --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import (  # noqa: E402
    PRESET_MODELS,
    REPO_ROOT,
    check_preset_or_folder,
    format_spread,
    machine_description,
    recorded_command,
    section_markers,
    spread,
    write_outputs,
)

# Run in each commit's tree: load, warm up, time one call; print the seconds as JSON on the last line.
WORKER = """
import json, sys, time
import torch
settings = json.loads(sys.argv[1])
threads = settings.pop("threads")
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
from benchmarks.benchmarking_utils import load_preset_or_folder
pipe = load_preset_or_folder(settings.pop("model"))
pipe.set_progress_bar_config(disable=True)
labels = [i % pipe.transformer.config.num_classes for i in range(settings.pop("batch_size"))]
warmup, calls = settings.pop("warmup"), settings.pop("calls")
call = lambda: pipe(labels, generator=torch.Generator().manual_seed(0), output_type="latent", **settings)
for _ in range(warmup):
    call()
seconds = []
for _ in range(calls):
    start = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(seconds)[len(seconds) // 2]}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--after", default=".", help="the commit measured against it; `.` is the working tree")
    parser.add_argument("--model", default="shipped", help=f"one of {PRESET_MODELS}, `shipped` or a pipeline folder")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-inference-steps", type=int, default=16)
    parser.add_argument("--num-diffusion-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each one worker per commit (at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls in each worker before the timed ones")
    parser.add_argument("--calls", type=int, default=1, help="timed calls in each worker; their median counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.batch_size < 1 or args.warmup < 0 or args.calls < 1:
        parser.error("--repeats must be >= 3, --batch-size >= 1, --warmup >= 0 and --calls >= 1")
    check_preset_or_folder(parser, args.model)
    for name in ("before", "after"):
        revision = getattr(args, name)
        if (
            revision != "."
            and subprocess.run(
                ["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                cwd=REPO_ROOT,
                capture_output=True,
            ).returncode
        ):
            parser.error(f"--{name}: {revision!r} is not a commit of this repository")
    return args


def export_tree(revision: str, folder: Path) -> Path:
    """The tree of `revision` in `folder` (`.`: the repository itself, as it is on disk)."""
    if revision == ".":
        return REPO_ROOT
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision], cwd=REPO_ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def time_in_tree(tree: Path, args: argparse.Namespace) -> float:
    """One worker's timed call in `tree`, in seconds."""
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    settings = {
        "model": model, "batch_size": args.batch_size, "warmup": args.warmup, "calls": args.calls,
        "num_inference_steps": args.num_inference_steps, "num_diffusion_steps": args.num_diffusion_steps,
        "guidance_scale": args.guidance_scale, "threads": args.threads,
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(settings)], cwd=tree, env=env, capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"the worker in {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    times = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {name: export_tree(getattr(args, name), Path(tmp) / name) for name in times}
        for round_index in range(args.repeats):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for name in order:
                times[name].append(time_in_tree(trees[name], args))
                print(f"round {round_index + 1}: {name} {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    ratios = [after / before for before, after in zip(times["before"], times["after"])]
    revisions = {name: getattr(args, name) for name in times}
    setting = (
        f"{args.model}, batch {args.batch_size}, {args.num_inference_steps} x {args.num_diffusion_steps} steps, "
        f"guidance {args.guidance_scale}"
    )
    report = "\n".join(
        [
            f"## Two commits side by side: {setting} (benchmarks/bench_commits.py)",
            "",
            f"Machine: {machine_description(threads=args.threads)}. {args.repeats} rounds, one fresh worker per commit "
            f"in each, alternating which goes first; each worker makes {args.warmup} untimed call(s), then {args.calls} "
            "timed (its median counts).",
            "",
            "| commit | seconds per call, median (min-max) |",
            "|---|---|",
            f"| before: `{revisions['before']}` | {format_spread(spread(times['before']))} |",
            f"| after: `{revisions['after']}` | {format_spread(spread(times['after']))} |",
            "",
            f"After / before, per round: {format_spread(spread(ratios))} (1 = unchanged; below 1 = faster).",
            "",
            f"Command: `{recorded_command(__file__, argv)}`",
        ]
    )
    results = {"setting": setting, "revisions": revisions, "seconds": times, "ratios": ratios}
    write_outputs(args, report, results, section_markers(f"bench_commits {args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
