"""The writer's storage cost per record for exactly what a RAG query records, without the app.

    python benchmarks/writer_replay.py [--queries 300] [--batch 600] [--profile]

Runs the mock RAG pipeline of workload.py with aim-llama active, but with a backend that keeps
the pickled chunks instead of sending them to a writer process. It then stores the chunks of
the timed queries into a fresh local Aim repo through the writer's `RunSink` (what the writer
process does), in batches like the writer process's (it stores what arrives within half a
second together: ~600 chunks at 4 ms per query), and reports microseconds per record: wall time
and CPU time of the whole process (RocksDB's background threads included). The index build
and warm-up are stored first, untimed, so every sequence already exists. A developer's tool:
it isolates the writer's cost from the application's, which overhead.py cannot.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--queries", type=int, default=300)
ap.add_argument("--docs", type=int, default=50)
ap.add_argument("--batch", type=int, default=600, help="chunks per stored batch")
ap.add_argument("--profile", action="store_true", help="also print a cProfile of the storing")
ap.add_argument("--loop", default=None, metavar="READY_FILE",
                help="store the timed batches over and over at nice 10, until killed (a busy "
                     "neighbour for neighbour.py); READY_FILE is created when storing starts")
args = ap.parse_args()

tmp = Path(tempfile.mkdtemp(prefix="aim-llama-writer-replay-"))
atexit.register(shutil.rmtree, tmp, True)  # registered first: runs after Aim's own exit hooks
os.environ["AIM_REPO"] = str(tmp / "unused")  # activation needs a repo; nothing is written there
os.environ["AIM_SYSTEM_TRACKING_INTERVAL"] = "off"

import llama_index.core  # noqa: F401  (imported first: aim-llama instruments at once)
from pipeline import build_engine, question

import aim_llama
import aim_llama.auto
from aim_llama import autoinstrument
from aim_llama.aimrun import RunConfig, RunSink
from aim_llama.records import Flush, Track
from aim_llama.writer import loads_many

active = autoinstrument._active
assert active is not None, "aim-llama is not active"
writer = active.writer
kept: list[bytes] = []


class KeepBackend:
    """Keeps every chunk; acknowledges flushes at once."""

    def send(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            records = loads_many(chunk)
            for record in records:
                if isinstance(record, Flush):
                    writer._ack(record.token)
            kept.append(chunk)

    def close(self, deadline: float) -> bool:
        return True


writer._make_backend = KeepBackend  # type: ignore[method-assign]

engine = build_engine(args.docs)
for i in range(20):
    engine.query(question(i))
aim_llama.flush(30)
setup = len(kept)
for i in range(args.queries):
    engine.query(question(i))
aim_llama.flush(30)
autoinstrument.uninstrument()


def records_of(chunks: list[bytes]) -> list[Any]:
    return [r for r in loads_many(b"".join(chunks)) if not isinstance(r, Flush)] if chunks else []


repo = tmp / "repo"
sink = RunSink(RunConfig(repo=str(repo), system_tracking_interval=None, log_system_params=False))
sink.apply(records_of(kept[:setup]))  # the run and every sequence exist before the clock
timed = [records_of(kept[i:i + args.batch]) for i in range(setup, len(kept), args.batch)]
count = sum(len(batch) for batch in timed)
profiler = None
if args.profile:
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
if args.loop:
    os.nice(10)  # like the writer process
    Path(args.loop).touch()
    while True:
        for batch in timed:
            sink.apply(batch)
wall0, cpu0 = time.perf_counter(), time.process_time()
for batch in timed:
    sink.apply(batch)
wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
if profiler is not None:
    import pstats

    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
sink.close()
mix = collections.Counter(r.kind if isinstance(r, Track) else type(r).__name__
                          for batch in timed for r in batch)
print(f"records stored: {count} ({count / max(1, args.queries):.1f} per query; {dict(mix)})")
print(f"writer: {wall / count * 1e6:.1f} us/record wall, {cpu / count * 1e6:.1f} us/record CPU "
      f"(all threads), {cpu / max(1, args.queries) * 1e3:.2f} ms CPU per query")
sys.exit(0 if sink.lost == 0 else 1)
