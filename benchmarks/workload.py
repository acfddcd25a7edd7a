"""One timed repetition of the mock RAG pipeline under one configuration (a child of overhead.py).

    python benchmarks/workload.py CONFIG --out result.json [--queries 300] [--warmup 20]
        [--docs 50] [--repo PATH] [--profile prof.out]

CONFIG is one of `uninstrumented`, `aimcallback`, `aim-llama` or `aim-llama-thread` (the last two
only differ by AIM_LLAMA_WRITER, which the parent sets). The index is built and `--warmup`
queries run before the clock starts; only the query loop is timed. The result is written as
JSON to `--out` (not stdout, which aim-llama and Aim may tee into the run's logs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CONFIGS = ("uninstrumented", "aimcallback", "aim-llama", "aim-llama-thread")
# Diagnostics (not in the default set): where does aim-llama's app-side time go?
#   diag-handler-only: aim-llama's handler builds every record, then discards it (no writer);
#   diag-writer-devnull: the full app side (handler, queue, sender thread, pickling, pipe
#   writes) with batches written to /dev/null instead of a writer process storing them in Aim.
DIAGNOSTICS = ("diag-handler-only", "diag-writer-devnull")

parser = argparse.ArgumentParser()
parser.add_argument("config", choices=CONFIGS + DIAGNOSTICS)
parser.add_argument("--out", required=True)
parser.add_argument("--queries", type=int, default=300)
parser.add_argument("--warmup", type=int, default=20)
parser.add_argument("--docs", type=int, default=50)
parser.add_argument("--repo", default=None, help="Aim repo for aimcallback (aim-llama reads AIM_REPO)")
parser.add_argument("--profile", default=None, help="write a cProfile of the query loop here")
parser.add_argument("--attribute", action="store_true",
                    help="aim-llama: time aim-llama's entry points and hot helpers (wall clock)")
parser.add_argument("--no-settle", action="store_true",
                    help="aim-llama: do not wait for the writer to start and drain before timing")
args = parser.parse_args()

AIM_LLAMA = args.config.startswith(("aim-llama", "diag-"))
if AIM_LLAMA:
    import aim_llama.auto  # what a user adds: the only aim-llama line

from llama_index.core import Settings
from pipeline import build_engine, question

if args.config == "aimcallback":
    from llama_index.callbacks.aim import AimCallback

    # Its defaults, except log_system_params (it imports pkg_resources, gone in setuptools 82).
    Settings.callback_manager.add_handler(AimCallback(repo=args.repo, log_system_params=False))

if args.config.startswith("diag-"):
    from aim_llama import autoinstrument

    _active = autoinstrument._active
    assert _active is not None, "aim-llama did not instrument"
    if args.config == "diag-handler-only":
        _active.handler.submit = lambda record: None
        _active.handler.submit_many = lambda records: None
    else:
        from aim_llama import writer as _writer_mod
        from aim_llama.records import Flush

        class DevNullBackend:
            """Pickles and writes every batch like ProcessBackend, to /dev/null; acks at once."""

            def __init__(self, on_ack: object) -> None:
                self.fd = os.open(os.devnull, os.O_WRONLY)
                self.on_ack = on_ack

            def send(self, chunks: list) -> None:
                _writer_mod.write_raw_frame(self.fd, b"".join(chunks))
                for chunk in chunks:
                    if len(chunk) > 64:  # a flush request travels alone in a tiny chunk
                        continue
                    for rec in _writer_mod.loads_many(chunk):
                        if isinstance(rec, Flush):
                            self.on_ack(rec.token)  # type: ignore[operator]

            def close(self, deadline: float) -> bool:
                os.close(self.fd)
                return True

        _w = _active.writer
        _w._make_backend = lambda: DevNullBackend(_w._ack)

engine = build_engine(args.docs)
for i in range(args.warmup):
    engine.query(question(i))

# aim-llama starts its writer (a process importing Aim, or a thread) at the first record and
# does so asynchronously; AimCallback pays the same start-up synchronously in its constructor.
# Wait for it here so the timed loop measures the steady state, and report how long it took.
settle_s = 0.0
settled = None
if AIM_LLAMA and not args.no_settle:
    import aim_llama

    t_settle = time.perf_counter()
    settled = aim_llama.flush(120)
    settle_s = time.perf_counter() - t_settle

profiler = None
if args.profile:
    import cProfile

    profiler = cProfile.Profile()



def writer_pid() -> int | None:
    """pid of aim-llama's writer process, if there is one."""
    if not AIM_LLAMA:
        return None
    from aim_llama import autoinstrument

    proc = getattr(getattr(autoinstrument._active.writer, "_backend", None), "proc", None)
    return getattr(proc, "pid", None)


def cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process from /proc, in seconds."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# (module, class or None, function, counts toward the total: entry points on the app thread)
ATTRIBUTE_TARGETS = [
    ("aim_llama.handler", "AimLlamaHandler", "on_event_start", True),
    ("aim_llama.handler", "AimLlamaHandler", "on_event_end", True),
    ("aim_llama.dispatcher", "AimSpanHandler", "span_enter", True),
    ("aim_llama.dispatcher", "AimSpanHandler", "span_exit", True),
    ("aim_llama.dispatcher", "AimSpanHandler", "span_drop", True),
    ("aim_llama.dispatcher", "AimEventHandler", "handle", True),
    ("aim_llama.content", "ContentPolicy", "redact", False),
    ("aim_llama.tokens", None, "estimate", False),
]
attribution: dict[str, list[float]] = {}


def _timed(original: object, acc: list[float], clock: object) -> object:
    def timed(*a: object, **k: object) -> object:
        t = clock()  # type: ignore[operator]
        try:
            return original(*a, **k)  # type: ignore[operator]
        finally:
            acc[0] += clock() - t  # type: ignore[operator]
            acc[1] += 1

    return timed


def attribute() -> None:
    """Wrap aim-llama's entry points with timers. `perf_counter` (~60 ns a call here), not
    `thread_time`: that is a system call (~0.7 us), twice per call, which overstated aim-llama's
    share by ~80 us per query; the query thread is the only busy Python thread of the loop."""
    import importlib

    clock = time.perf_counter
    for module_name, cls_name, func_name, _entry in ATTRIBUTE_TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, cls_name, None) if cls_name else module
        original = getattr(owner, func_name, None) if owner is not None else None
        if original is None:
            continue
        key = f"{cls_name + '.' if cls_name else module_name + '.'}{func_name}"
        acc = attribution.setdefault(key, [0.0, 0])
        timed = _timed(original, acc, clock)
        setattr(owner, func_name, timed)
        if cls_name is None:  # also where it was imported by name
            for other in list(sys.modules.values()):
                if getattr(other, "__name__", "").startswith("aim_llama.") and \
                        getattr(other, func_name, None) is original:
                    setattr(other, func_name, timed)
    # The registered span handler calls the observer's bound methods it holds as instance
    # attributes (dispatcher.AimSpanHandler): wrap those too.
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama.dispatcher import AimSpanHandler

    for handler in get_dispatcher().span_handlers:
        if isinstance(handler, AimSpanHandler):
            for name in ("span_enter", "span_exit", "span_drop"):
                if name in handler.__dict__:
                    acc = attribution.setdefault(f"AimSpanHandler.{name}", [0.0, 0])
                    handler.__dict__[name] = _timed(handler.__dict__[name], acc, clock)


if args.attribute and AIM_LLAMA:
    attribute()

per_query: list[float] = []
perf = time.perf_counter
wpid = writer_pid()
writer_cpu0 = cpu_s(wpid)
app_cpu0 = time.process_time()
thread_cpu0 = time.thread_time()
if profiler is not None:
    profiler.enable()
start = perf()
for i in range(args.queries):
    t0 = perf()
    engine.query(question(args.warmup + i))
    per_query.append(perf() - t0)
loop_s = perf() - start
app_cpu_s = time.process_time() - app_cpu0
thread_cpu_s = time.thread_time() - thread_cpu0
writer_cpu1 = cpu_s(wpid)
if profiler is not None:
    profiler.disable()
    profiler.dump_stats(args.profile)

result: dict[str, object] = {
    "config": args.config,
    "queries": args.queries,
    "warmup": args.warmup,
    "docs": args.docs,
    "loop_s": loop_s,
    "ms_per_query": loop_s * 1000.0 / max(1, args.queries),
    "per_query_ms": [round(t * 1000.0, 4) for t in per_query],
    "pid": os.getpid(),
    "settle_s": settle_s,
    "settled": settled,
    "app_cpu_ms_per_query": app_cpu_s * 1000.0 / max(1, args.queries),
    "app_thread_cpu_ms_per_query": thread_cpu_s * 1000.0 / max(1, args.queries),
    "writer_cpu_ms_per_query": None if writer_cpu0 is None or writer_cpu1 is None
    else (writer_cpu1 - writer_cpu0) * 1000.0 / max(1, args.queries),
}
if AIM_LLAMA:
    import aim_llama
    from aim_llama import autoinstrument

    active = autoinstrument._active
    result["instrumented"] = aim_llama.is_instrumented()
    result["writer"] = getattr(getattr(active, "writer", None), "backend_name", None)
    result["queue_len_at_loop_end"] = active.writer.queued if active else None
    result["dropped"] = active.writer.dropped if active else None
if attribution:
    n = max(1, args.queries)
    entries = {key for m, c, f, e in ATTRIBUTE_TARGETS if e for key in [f"{c}.{f}"]}
    result["attribution_us_per_query"] = {
        key: {"us_per_query": acc[0] * 1e6 / n, "calls_per_query": acc[1] / n}
        for key, acc in attribution.items()
    }
    result["instrumentation_ms_per_query"] = sum(
        acc[0] for key, acc in attribution.items() if key in entries) * 1000.0 / n
result["aim_imported_in_app"] = "aim" in sys.modules
result["loop_end_wall"] = time.time()
with open(args.out, "w") as fh:
    json.dump(result, fh)
