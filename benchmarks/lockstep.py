"""Overhead ratios measured in lockstep: one process per configuration, taking turns.

    python benchmarks/lockstep.py [--rounds 60] [--turn 25] [--configs uninstrumented,aim-llama,diag-noop]

Why: on a small shared VM the speed of the same program drifts by ±30 % from one second to the
next and from one process to the next, so medians of whole runs (overhead.py) need many
repetitions to say anything below ~10 %. Here every configuration is a live process that has
built the pipeline and warmed up; they run `--turn` queries each in turn (order rotated every
round), so each round compares the configurations within about half a second of each other.
Reported per configuration: the median over rounds of its time per query divided by the
uninstrumented one of the same round (paired ratio), the same for the query thread's CPU
time, and the ratio of total times. A process waiting for its turn is idle (its writer may
still store in the background, as it would between requests), so this measures the cost on
the query path; overhead.py measures whole runs. Also imported by overhead.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import config_env


def run_lockstep(configs: list[str], rounds: int, turn: int, tmp: Path,
                 docs: int = 50) -> dict[str, dict[str, Any]]:
    """Start one worker per configuration, run `rounds` rounds of `turn` queries each."""
    workers: dict[str, tuple[subprocess.Popen[str], Any]] = {}
    try:
        for config in configs:
            read_fd, write_fd = os.pipe()
            repo = tmp / f"repo-{config}"
            kind = config.split("@", 1)[0]  # "aim-llama@2": a second process of one configuration
            cmd = [sys.executable, str(HERE / "lockstep_worker.py"), kind, "--docs", str(docs),
                   "--reply-fd", str(write_fd), "--repo", str(repo)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, text=True, pass_fds=(write_fd,),
                                    env=config_env(kind, repo), cwd=str(HERE))
            os.close(write_fd)
            workers[config] = (proc, os.fdopen(read_fd, "r"))

        def turn_of(config: str) -> tuple[float, float]:
            proc, replies = workers[config]
            assert proc.stdin is not None
            proc.stdin.write(f"{turn}\n")
            proc.stdin.flush()
            line = replies.readline()
            if not line:
                raise RuntimeError(f"lockstep worker {config!r} exited (exit code {proc.wait()})")
            wall, cpu = line.split()
            return float(wall), float(cpu)

        for config in configs:  # one discarded turn each: everything warm and started
            turn_of(config)
        wall: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(rounds):
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                w, c = turn_of(config)
                wall[config].append(w)
                cpu[config].append(c)
    finally:
        for proc, _replies in workers.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc, replies in workers.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            replies.close()
    base = configs[0]
    out: dict[str, dict[str, Any]] = {}
    for config in configs:
        out[config] = {
            "ms_per_query": statistics.median(wall[config]),
            "paired_ratio": statistics.median(a / b for a, b in zip(wall[config], wall[base], strict=True)),
            "paired_cpu_ratio": statistics.median(a / b for a, b in zip(cpu[config], cpu[base], strict=True)),
            "total_ratio": sum(wall[config]) / sum(wall[base]),
            "wall_ms": wall[config],
            "cpu_ms": cpu[config],
        }
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of a `run_lockstep` result."""
    lines = ["| configuration | median ms/query | paired ratio | paired thread-CPU ratio | "
             "total-time ratio |", "|---|---:|---:|---:|---:|"]
    for config, r in results.items():
        lines.append(f"| {config} | {r['ms_per_query']:.2f} | {r['paired_ratio']:.3f}× | "
                     f"{r['paired_cpu_ratio']:.3f}× | {r['total_ratio']:.3f}× |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--turn", type=int, default=25, help="queries per turn")
    ap.add_argument("--configs", default="uninstrumented,aim-llama,diag-noop",
                    help="comma-separated; the first is the baseline")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="aim-llama-lockstep-") as tmp:
        results = run_lockstep(configs, args.rounds, args.turn, Path(tmp))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
