"""CPU threads of `diffusers-mar generate`: one thread against PyTorch's default and `OMP_WAIT_POLICY=PASSIVE`, on an
idle machine and beside a busy process.

Each run is the command a user types (a fresh `python -m diffusers_mar generate` process, 80 digits of the shipped
model as in the README), timed by the command's own "Generated ... in X s" line (sampling only, without start-up)
and by the wall clock (start-up and writing included). Settings and loads are interleaved, `--repeats` times, so a
change in the machine's other load hits every setting alike; the report gives the median and the range. A run over
`--timeout` seconds is stopped and counted as the timeout (the table marks it with >).

Settings: `1 thread` (`--num-threads 1`), `default` (`--num-threads` = PyTorch's default, one per core), `passive`
(the default thread count with `OMP_WAIT_POLICY=PASSIVE`: waiting OpenMP threads sleep instead of spinning).
Loads: `idle` (no process of ours besides the command) and `busy` (one process spinning on a core).

    python benchmarks/bench_cli_threads.py --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.eval_digits import update_docs_section  # noqa: E402

SECTION = "CPU threads of the command line"
LABELS = [str(label) for label in range(10)]


def settings() -> dict[str, tuple[str, dict]]:
    """Setting name -> (`--num-threads` value, extra environment)."""
    default = str(torch.get_num_threads())
    return {"1 thread": ("1", {}), "default": (default, {}), "passive": (default, {"OMP_WAIT_POLICY": "PASSIVE"})}


def run_generate(num_threads: str, env_extra: dict, folder: str, timeout: float) -> tuple[float, float]:
    """(sampling seconds, wall seconds) of one `generate` run; both `timeout` if it ran over."""
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "diffusers_mar", "generate", "--class-labels", *LABELS]
    command += ["--num-images-per-label", "8", "-o", os.path.join(folder, "grid.png"), "--overwrite", "--quiet"]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [*command, "--num-threads", num_threads], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return timeout, timeout
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"generate failed:\n{result.stderr}")
    return float(re.search(r"Generated 80 images in ([\d.]+) s", result.stderr).group(1)), wall


def measure(repeats: int, timeout: float) -> dict:
    """{load: {setting: {"sampling": [...], "wall": [...]}}}, interleaved over repeats, loads and settings."""
    results = {load: {name: {"sampling": [], "wall": []} for name in settings()} for load in ("idle", "busy")}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats):
            for load in results:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
                try:
                    for name, (threads, env_extra) in settings().items():
                        sampling, wall = run_generate(threads, env_extra, folder, timeout)
                        results[load][name]["sampling"].append(sampling)
                        results[load][name]["wall"].append(wall)
                        print(
                            f"repeat {repeat} {load:<4} {name:<8} {sampling:6.1f} s sampling, {wall:6.1f} s wall",
                            flush=True,
                        )
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
    return results


def report(results: dict, args: argparse.Namespace, load_average: tuple[float, float, float]) -> str:
    def cell(values: list[float]) -> str:
        over = ">" if max(values) >= args.timeout else ""
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{over}{max(values):.1f})"

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"PyTorch's default {torch.get_num_threads()} threads; 1-minute load average {load_average[0]:.1f} before "
        "the run (the machine is shared, so `idle` means no busy process of ours).",
        f"Command: `python benchmarks/bench_cli_threads.py --repeats {args.repeats} --timeout {args.timeout:g}` "
        "(80 digits of the shipped model, `diffusers-mar generate --class-labels 0 ... 9 --num-images-per-label 8`).",
        "",
        f"Seconds, median (min-max) of {args.repeats} interleaved runs; sampling = the command's own timing, wall = "
        "the whole process (Python and PyTorch start-up included).",
        "",
        "| load | setting | sampling s | wall s |",
        "|---|---|---|---|",
    ]
    for load, by_setting in results.items():
        for name, values in by_setting.items():
            lines.append(f"| {load} | {name} | {cell(values['sampling'])} | {cell(values['wall'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds after which a run is stopped")
    parser.add_argument("--output-json", help="write the raw timings here")
    parser.add_argument("--write-docs", action="store_true", help=f"write the section '{SECTION}' of --docs-path")
    parser.add_argument("--docs-path", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the busy process
    load_average = os.getloadavg()
    results = measure(args.repeats, args.timeout)
    text = report(results, args, load_average)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    if args.write_docs:
        update_docs_section(Path(args.docs_path), SECTION, text)


if __name__ == "__main__":
    main()
