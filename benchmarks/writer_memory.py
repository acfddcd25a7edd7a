"""The writer process's memory over a long run of the mock RAG pipeline (a soak).

    python benchmarks/writer_memory.py [--queries 200000] [--every 20000]

Runs `--queries` queries of the pipeline every benchmark measures (pipeline.py) with
`import aim_llama.auto` into a fresh local repo, waits for the writer (`aim_llama.flush()`)
every `--every` queries and prints the writer process's and the application's RSS then, and
how many records were dropped. `--site DIR` puts DIR first on the writer's (and the app's)
PYTHONPATH: a `sitecustomize.py` there that checks `AIM_LLAMA_ROLE == "writer"` runs in the
writer process only (to trace its allocations, say). ~4 minutes per 100 000 queries on 2
cores; not part of CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--queries", type=int, default=200_000)
ap.add_argument("--every", type=int, default=20_000)
ap.add_argument("--docs", type=int, default=50)
ap.add_argument("--site", default=None, help="a directory with a sitecustomize.py for the writer")
args = ap.parse_args()

scratch = Path(tempfile.mkdtemp(prefix="aim-llama-soak-"))
os.environ["AIM_REPO"] = str(scratch / "repo")
if args.site:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(args.site).resolve()), os.environ.get("PYTHONPATH")) if p)

sys.path.insert(0, str(HERE))
# isort: off
import aim_llama.auto  # (what a user adds, first)
import aim_llama
from aim_llama import autoinstrument
from pipeline import build_engine, question
# isort: on


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def writer_pid() -> int:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"aim_llama.writer_process" in f.read():
                        return int(entry)
    raise SystemExit("no writer process (is AIM_LLAMA_WRITER=thread set?)")


engine = build_engine(args.docs)
engine.query(question(0))
aim_llama.flush(120)
wpid = writer_pid()
print(f"repo {os.environ['AIM_REPO']}")
print("| queries | seconds | writer RSS MB | app RSS MB | dropped |")
print("|---:|---:|---:|---:|---:|")
print(f"| 0 | 0 | {rss_mb(wpid):.0f} | {rss_mb(os.getpid()):.0f} | 0 |", flush=True)
t0 = time.monotonic()
for i in range(1, args.queries + 1):
    engine.query(question(i))
    if i % args.every == 0:
        aim_llama.flush(300)
        active = autoinstrument._active
        dropped = active.writer.dropped if active is not None else "?"
        print(f"| {i} | {time.monotonic() - t0:.0f} | {rss_mb(wpid):.0f} | "
              f"{rss_mb(os.getpid()):.0f} | {dropped} |", flush=True)
