"""One configuration of the mock RAG pipeline, running queries when lockstep.py says so.

    python benchmarks/lockstep_worker.py CONFIG [--docs 50] [--warmup 20]

Builds the pipeline (see pipeline.py), runs the warm-up, then reads lines from stdin: each
holds a number N; the worker runs the next N queries and answers one line on the
file descriptor given by `--reply-fd` with "wall_ms_per_query thread_cpu_ms_per_query". End of
input ends it (and, for aim-llama, its normal exit flush). Started by lockstep.py, not by hand.

CONFIG: `uninstrumented`, `aimcallback`, `aim-llama`, `aim-llama-thread` (the parent sets the
environment as overhead.py does), or the diagnostic `diag-noop`: aim-llama's handlers are
registered on LlamaIndex but return at once, which is the floor any handler-based
instrumentation pays (LlamaIndex's own dispatch to a registered handler). For attribution:
`diag-nospans` (the span handler returns at once, events are recorded), `diag-noevents` (the
other way round), `diag-nosubmit` (the dispatcher records are mapped, not handed to the writer).
`lockstep.py` also accepts `CONFIG@2` etc.: another process of the same configuration (how much
two processes of one configuration differ).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--docs", type=int, default=50)
parser.add_argument("--warmup", type=int, default=20)
parser.add_argument("--repo", default=None, help="Aim repo for aimcallback")
parser.add_argument("--reply-fd", type=int, required=True)
args = parser.parse_args()

AIM_LLAMA = args.config.startswith(("aim-llama", "diag-"))
if AIM_LLAMA:
    import aim_llama.auto  # what a user adds: the only aim-llama line

from pipeline import build_engine, question

if args.config == "aimcallback":
    from llama_index.callbacks.aim import AimCallback
    from llama_index.core import Settings

    Settings.callback_manager.add_handler(AimCallback(repo=args.repo, log_system_params=False))

engine = build_engine(args.docs)

if args.config == "diag-noop":
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama import autoinstrument
    from aim_llama.dispatcher import AimEventHandler, AimSpanHandler

    for h in get_dispatcher().span_handlers + get_dispatcher().event_handlers:
        if isinstance(h, (AimSpanHandler, AimEventHandler)):
            for name in ("span_enter", "span_exit", "span_drop", "handle"):
                h.__dict__[name] = lambda *a, **k: None  # instance attributes win over methods
    active = autoinstrument._active
    assert active is not None
    active.handler.on_event_start = lambda *a, **k: k.get("event_id", "")
    active.handler.on_event_end = lambda *a, **k: None

if args.config in ("diag-nospans", "diag-noevents", "diag-nosubmit"):
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama.dispatcher import AimEventHandler, AimSpanHandler

    for h in get_dispatcher().span_handlers + get_dispatcher().event_handlers:
        if args.config == "diag-nospans" and isinstance(h, AimSpanHandler):
            for name in ("span_enter", "span_exit", "span_drop"):
                h.__dict__[name] = lambda *a, **k: None
        if args.config == "diag-noevents" and isinstance(h, AimEventHandler):
            h.__dict__["handle"] = lambda *a, **k: None
        if args.config == "diag-nosubmit" and isinstance(h, AimSpanHandler):
            h.obs._emit = lambda records: None

for i in range(args.warmup):
    engine.query(question(i))
if AIM_LLAMA:
    import aim_llama

    aim_llama.flush(120)  # the writer is up and has stored the warm-up: measure the steady state

reply = os.fdopen(args.reply_fd, "w", buffering=1)
done = args.warmup
for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    c0 = time.thread_time()
    for _ in range(n):
        engine.query(question(done))
        done += 1
    wall = (time.perf_counter() - t0) * 1000.0 / n
    cpu = (time.thread_time() - c0) * 1000.0 / n
    reply.write(f"{wall} {cpu}\n")
