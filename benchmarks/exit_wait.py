"""How long a short instrumented program waits at exit for its records to be stored.

    python benchmarks/exit_wait.py [--runs 3] [--work 0,1.5]

Runs a program that makes one MockLLM call, then works (sleeps) W seconds, then prints the
time and exits: once uninstrumented, once with `import aim_llama.auto` (process writer, a
local repo in a temporary directory). Reports, per W, the median time from that last line
to the process's end, and of the whole program (start to end). The writer process starts
at the first record and must start Python, import Aim, open the run, store and finalize it
before the program may end; work done after the first record overlaps with that. Set
PYTHONPATH to another checkout's `src` to measure that code instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROGRAM = """
import sys, time
if sys.argv[1] == "aim":
    import aim_llama.auto
from llama_index.core.llms import MockLLM
MockLLM(max_tokens=3).complete("one call")
time.sleep(float(sys.argv[2]))
print("END", time.time(), flush=True)
"""


def exit_wait(mode: str, work: float, repo: str) -> tuple[float, float]:
    """(seconds from the program's last line to its end, seconds from its start to its end)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIM")}
    env["AIM_REPO"] = repo
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, mode, str(work)], env=env,
                          capture_output=True, text=True, timeout=120)
    ended = time.time()
    last = float(proc.stdout.split("END", 1)[1].split()[0])
    return ended - last, ended - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="0,1.5")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "repo")
        exit_wait("aim", 0, repo)  # creates the repo: not measured
        print("| work after the first record | uninstrumented: exit / whole program | "
              "aim-llama: exit / whole program |")
        print("|---:|---:|---:|")
        for work in (float(w) for w in args.work.split(",")):
            plain: list[tuple[float, float]] = []
            aim: list[tuple[float, float]] = []
            for _ in range(args.runs):  # alternating, so that drifts hit both alike
                plain.append(exit_wait("plain", work, repo))
                aim.append(exit_wait("aim", work, repo))
            p_exit, p_all = (statistics.median(x) for x in zip(*plain, strict=True))
            a_exit, a_all = (statistics.median(x) for x in zip(*aim, strict=True))
            print(f"| {work:g} s | {p_exit:.2f} s / {p_all:.2f} s | {a_exit:.2f} s / {a_all:.2f} s |")


if __name__ == "__main__":
    main()
