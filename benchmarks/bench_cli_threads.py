"""CPU threads of `diffusers-mar generate`: one thread against PyTorch's default and `OMP_WAIT_POLICY=PASSIVE`, on the
machine as it is and beside one more busy process.

Each setting has its own worker process (the environment variable must be set before PyTorch starts), which imports
the package once and then runs the command line's `main` on request: 80 digits of the shipped model, as in the
README (`generate --class-labels 0 ... 9 --num-images-per-label 8`). A run is timed around `main` (loading the 2 MB
model, sampling, writing the grid), without Python's start-up, which a busy machine stretches to tens of seconds for
every setting alike. Settings and loads are interleaved, `--repeats` times, so a change in the machine's other load
hits every setting alike; the report gives the median and the range. A run over `--timeout` seconds is stopped (its
worker is replaced) and counted as the timeout, marked `>`.

Settings: `1 thread` (`--num-threads 1`), `default` (`--num-threads` = PyTorch's default, one per core), `passive`
(the default thread count with `OMP_WAIT_POLICY=PASSIVE`: waiting OpenMP threads sleep instead of spinning).
Loads: `as is` (no process of ours besides the worker; on a shared machine other people's work still runs) and
`+1 busy` (one more process spinning on a core).

    python benchmarks/bench_cli_threads.py --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.benchmarking_utils import DOCS_PATH, machine_description, spread, update_titled_section  # noqa: E402

SECTION = "CPU threads of the command line"
LABELS = [str(label) for label in range(10)]
LOADS = ("as is", "+1 busy")

# Arguments: the labels, then the options. Warms up on one image, then runs `diffusers_mar.cli.main` once per line
# read and replies "<exit code> <seconds>".
WORKER = r"""
import contextlib, sys, time
from diffusers_mar import cli
labels, options = sys.argv[1].split(), sys.argv[2:]
with contextlib.redirect_stdout(sys.stderr):
    cli.main(["generate", "--class-labels", labels[0], "--num-images-per-label", "1", *options])
print("ready", flush=True)
command = ["generate", "--class-labels", *labels, "--num-images-per-label", "8", *options]
for _ in sys.stdin:
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = cli.main(command)
    print(code, time.perf_counter() - start, flush=True)
"""


def settings() -> dict[str, tuple[str, dict]]:
    """Setting name -> (`--num-threads` value, extra environment)."""
    default = str(torch.get_num_threads())
    return {"1 thread": ("1", {}), "default": (default, {}), "passive": (default, {"OMP_WAIT_POLICY": "PASSIVE"})}


class Worker:
    """A process that runs the command line in-process on request, with the setting's threads and environment."""

    def __init__(self, num_threads: str, env_extra: dict, folder: str):
        self.env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
        output = os.path.join(folder, f"grid-{num_threads}-{len(env_extra)}.png")
        self.options = ["--quiet", "--overwrite", "-o", output, "--num-threads", num_threads]
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, " ".join(LABELS), *self.options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the worker failed to start")

    def run(self, timeout: float) -> float:
        """Seconds of one run, or `timeout` if it ran over (the worker is then replaced)."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            self.stop()
            self.start()
            return timeout
        code, seconds = self.process.stdout.readline().split()
        if code != "0":
            raise RuntimeError(f"generate exited with {code}")
        return float(seconds)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def measure(repeats: int, timeout: float) -> dict:
    """{load: {setting: [seconds, ...]}}, interleaved over repeats, loads and settings."""
    results = {load: {name: [] for name in settings()} for load in LOADS}
    with tempfile.TemporaryDirectory() as folder:
        workers = {name: Worker(threads, env_extra, folder) for name, (threads, env_extra) in settings().items()}
        try:
            for repeat in range(repeats):
                for load in LOADS:
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "as is" else None
                    try:
                        for name, worker in workers.items():
                            seconds = worker.run(timeout)
                            results[load][name].append(seconds)
                            print(f"repeat {repeat} {load:<7} {name:<8} {seconds:6.1f} s", flush=True)
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
        finally:
            for worker in workers.values():
                worker.stop()
    return results


def report(results: dict, args: argparse.Namespace, load_average: tuple[float, float, float]) -> str:
    def cell(values: list[float]) -> str:
        mark = lambda value: f">{value:.0f}" if value >= args.timeout else f"{value:.1f}"  # noqa: E731
        stats = spread(values)
        return f"{mark(stats['median'])} ({mark(stats['min'])} to {mark(stats['max'])})"

    lines = [
        f"Machine: {machine_description()} (torch's default threads); 1-minute load average {load_average[0]:.1f} "
        "when the run started (other people's work on the shared machine).",
        f"Command: `python benchmarks/bench_cli_threads.py --repeats {args.repeats} --timeout {args.timeout:g}` "
        "(80 digits of the shipped model: `diffusers-mar generate --class-labels 0 ... 9 --num-images-per-label 8`).",
        "",
        f"Seconds per command (load, sample, write; Python's start-up excluded), median (min to max) of "
        f"{args.repeats} interleaved runs; `>{args.timeout:g}`: stopped at the timeout.",
        "",
        "| load | " + " | ".join(settings()) + " |",
        "|---|" + "---|" * len(settings()),
    ]
    for load, by_setting in results.items():
        lines.append(f"| {load} | " + " | ".join(cell(values) for values in by_setting.values()) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds after which a run is stopped")
    parser.add_argument("--output-json", help="write the raw timings here")
    parser.add_argument("--write-docs", action="store_true", help=f"write the section '{SECTION}' of --docs-path")
    parser.add_argument("--docs-path", default=str(DOCS_PATH))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s that stop our processes
    load_average = os.getloadavg()
    results = measure(args.repeats, args.timeout)
    text = report(results, args, load_average)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    if args.write_docs:
        update_titled_section(args.docs_path, SECTION, text)


if __name__ == "__main__":
    main()
