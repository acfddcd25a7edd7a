"""How much a busy neighbour on the other core slows the uninstrumented pipeline.

    python benchmarks/neighbour.py [--reps 6] [--queries 300]

aim-llama's writer process works on the machine's other core. This measures what that costs
an application that has no aim-llama at all: workload.py `uninstrumented`, alternating
between no neighbour, a pure-Python CPU burner, and a process storing RAG records into a
local Aim repo without pause (`writer_replay.py --loop`, nice 10 like the writer). A
developer's tool for the README's analysis of where the overhead comes from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import clean_env

BURNER = "import os\nos.nice(10)\nx = 0\nwhile True:\n    x = (x * 31 + 7) % 1000003\n"


def start(kind: str, tmp: Path) -> subprocess.Popen[bytes] | None:
    """The neighbour process, once it is busy; None for no neighbour."""
    if kind == "none":
        return None
    if kind == "cpu":
        return subprocess.Popen([sys.executable, "-c", BURNER], env=clean_env())
    ready = tmp / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(HERE / "writer_replay.py"), "--queries", "300",
                             "--batch", "600", "--loop", str(ready)], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError("writer_replay.py --loop exited")
        time.sleep(0.2)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    kinds = ("none", "cpu", "aim")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="aim-llama-neighbour-") as name:
        tmp = Path(name)
        for rep in range(args.reps):
            for kind in kinds[rep % 3:] + kinds[:rep % 3]:
                proc = start(kind, tmp)
                try:
                    subprocess.run([sys.executable, str(HERE / "workload.py"), "uninstrumented",
                                    "--queries", str(args.queries), "--out", str(tmp / "o.json")],
                                   env=clean_env(), check=True, stdout=subprocess.DEVNULL)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                ms = json.loads((tmp / "o.json").read_text())["ms_per_query"]
                times[kind].append(ms)
                print(f"rep {rep + 1}/{args.reps} neighbour={kind:4} {ms:.3f} ms/query", flush=True)
    base = statistics.median(times["none"])
    print("\n| neighbour on the other core | median ms/query | ratio | paired ratio |\n"
          "|---|---:|---:|---:|")
    for kind, label in zip(kinds, ("none", "pure-Python CPU burner (nice 10)",
                                   "Aim storing RAG records (nice 10)"), strict=True):
        med = statistics.median(times[kind])
        paired = statistics.median(t / n for t, n in zip(times[kind], times["none"], strict=True))
        print(f"| {label} | {med:.2f} | {med / base:.2f}× | {paired:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
