"""Cost of aim-llama's own code per query on the application thread, without machine noise.

    python benchmarks/handler_replay.py [--reps 3000] [--blocks 7]

Runs one query of the mock RAG pipeline (see workload.py) with aim-llama active, recording
every call LlamaIndex makes into aim-llama's handlers (dispatcher spans and events, callback
events) with their real arguments. It then replays that call sequence into the same handlers
`--reps` times per block and reports the fastest block in microseconds per query, split by
entry point. Records go to a counter instead of the writer (the writer's cost is measured by
overhead.py). A developer's tool: the end-to-end ratio comes from overhead.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("AIM_REPO", os.path.join(os.environ.get("TMPDIR", "/tmp"), "aim-llama-replay"))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=3000, help="replayed queries per block")
ap.add_argument("--blocks", type=int, default=7, help="blocks; the fastest is reported")
ap.add_argument("--docs", type=int, default=50)
ap.add_argument("--profile", action="store_true", help="also print a cProfile of one block")
args = ap.parse_args()

import llama_index.core  # noqa: F401  (imported first: aim-llama instruments at once)
from llama_index.core.instrumentation import get_dispatcher
from pipeline import build_engine, question

import aim_llama.auto  # noqa: F401
from aim_llama import autoinstrument
from aim_llama.dispatcher import AimEventHandler, AimSpanHandler

active = autoinstrument._active
assert active is not None, "aim-llama is not active (is AIM_LLAMA_ENABLED off?)"

submitted = [0]
_MISSING = object()


def count(record: Any) -> None:
    submitted[0] += 1


def count_many(n: int) -> None:
    submitted[0] += n


active.handler.submit = count  # both channels submit through the callback handler
active.handler.submit_many = lambda records: count_many(len(records))

engine = build_engine(args.docs)
for i in range(5):
    engine.query(question(i))

# Entry points: the methods LlamaIndex calls, wherever they live (the span handler holds the
# observer's bound methods as instance attributes; the others are methods of their class).
span_handler = next(h for h in get_dispatcher().span_handlers if isinstance(h, AimSpanHandler))
event_handler = next(h for h in get_dispatcher().event_handlers if isinstance(h, AimEventHandler))
ENTRY_POINTS: list[tuple[Any, str]] = [
    (span_handler, "span_enter"), (span_handler, "span_exit"), (span_handler, "span_drop"),
    (event_handler, "handle"), (active.handler, "on_event_start"),
    (active.handler, "on_event_end"),
]
calls: list[tuple[Any, str, tuple[Any, ...], dict[str, Any]]] = []
saved: list[tuple[Any, str, Any]] = []
for obj, name in ENTRY_POINTS:
    original = getattr(obj, name)  # bound
    saved.append((obj, name, obj.__dict__.get(name, _MISSING)))

    def recorder(*a: Any, _name: str = name, _orig: Any = original, _obj: Any = obj,
                 **k: Any) -> Any:
        calls.append((_obj, _name, a, k))
        return _orig(*a, **k)

    obj.__dict__[name] = recorder
submitted[0] = 0
engine.query(question(5))
for obj, name, before in saved:
    if before is _MISSING:
        del obj.__dict__[name]
    else:
        obj.__dict__[name] = before
records_per_query = submitted[0]

bound = [(getattr(obj, name), a, k, name) for obj, name, a, k in calls]
clock = time.perf_counter
best = float("inf")
for _block in range(args.blocks):
    t_block = clock()
    for _ in range(args.reps):
        for fn, a, k, _name in bound:
            fn(*a, **k)
    best = min(best, clock() - t_block)
# Per entry point (each call timed: adds ~0.1 us per call), fastest of the blocks too.
split: dict[str, float] = {}
for _block in range(args.blocks):
    acc: dict[str, float] = collections.defaultdict(float)
    for _ in range(max(1, args.reps // 3)):
        for fn, a, k, name in bound:
            t = clock()
            fn(*a, **k)
            acc[name] += clock() - t
    for name, value in acc.items():
        per = value / max(1, args.reps // 3)
        split[name] = min(split.get(name, float("inf")), per)

print(f"calls per query: {len(calls)} ({dict(collections.Counter(c[1] for c in calls))})")
print(f"records per query: {records_per_query}")
print(f"aim-llama on the application thread: {best / args.reps * 1e6:.1f} us/query "
      f"(fastest of {args.blocks} blocks of {args.reps} replayed queries)")
for name, value in sorted(split.items(), key=lambda kv: -kv[1]):
    print(f"  {name:15s} {value * 1e6:7.1f} us/query")

if args.profile:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.reps):
        for fn, a, k, _name in bound:
            fn(*a, **k)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
