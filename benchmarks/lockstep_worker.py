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
other way round), `diag-nosubmit` (the dispatcher records are mapped, not handed to the
writer), `diag-discard` (every record mapped, then dropped at the hand-off: no writer process at
all), `diag-deferred` (the same observer fed in one burst per request: every call is buffered
with its time and replayed when the request's root span exits; is batched work cheaper?).
Floors of other designs: `diag-minimal` (each span and event call appends one small tuple to a
list: the least any span-tree recorder does) and `diag-raw` (what a design that ships raw data
to the writer process and maps it there would do on the application thread: span tuples plus
the payloads this pipeline's records need — prompt, response, embedded texts, node ids,
scores and text heads, question and answer — pickled once per request into a bounded deque);
`diag-raw-send` adds the hand-off (a sender thread writing the deque to a pipe every 50 ms).
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


def replace_handlers(enter, exit_, handle):
    """Put `enter` / `exit_` / `handle` in place of aim-llama's dispatcher handlers (instance
    attributes win over methods) and make its callback handler return at once."""
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama import autoinstrument
    from aim_llama.dispatcher import AimEventHandler, AimSpanHandler

    for h in get_dispatcher().span_handlers + get_dispatcher().event_handlers:
        if isinstance(h, AimSpanHandler):
            h.__dict__["span_enter"] = enter
            h.__dict__["span_exit"] = exit_
            h.__dict__["span_drop"] = exit_
        if isinstance(h, AimEventHandler):
            h.__dict__["handle"] = handle
    active = autoinstrument._active
    assert active is not None
    active.handler.on_event_start = lambda *a, **k: k.get("event_id", "")
    active.handler.on_event_end = lambda *a, **k: None


if args.config == "diag-noop":
    replace_handlers(lambda *a, **k: None, lambda *a, **k: None, lambda *a, **k: None)

if args.config == "diag-minimal":
    # The least a span-tree recorder can do: one tuple per call into a list, nothing else.
    import time as _time

    _log: list = []
    _pc = _time.perf_counter

    def _enter(id_, bound_args, instance=None, parent_id=None, tags=None, **kw):
        _log.append((id_, parent_id, _pc()))
        if len(_log) > 10000:
            _log.clear()

    def _exit(id_, bound_args, instance=None, result=None, **kw):
        _log.append((id_, _pc()))

    def _handle(event, **kw):
        _log.append((type(event).__name__, event.span_id, _pc()))

    replace_handlers(_enter, _exit, _handle)

if args.config in ("diag-raw", "diag-raw-send"):
    # The floor of a "ship raw data" design: span tuples plus the payloads the records need,
    # pickled once per request and queued; no mapping, no tree, no records on this side.
    # `diag-raw-send` also hands the queue to another process as aim-llama's writer does: a
    # sender thread wakes every 50 ms and writes what is queued to a pipe (a `cat` that
    # discards it), so the floor includes the hand-off.
    import collections
    import pickle
    import time as _time

    _buf: list = []
    _queue: collections.deque = collections.deque(maxlen=10000)
    if args.config == "diag-raw-send":
        import subprocess
        import threading

        _sink = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        _fd = _sink.stdin.fileno()

        def _send_loop():
            wake = threading.Event()
            while True:
                wake.wait(0.05)
                parts = []
                try:
                    while True:
                        parts.append(_queue.popleft())
                except IndexError:
                    pass
                if parts:
                    data = memoryview(b"".join(parts))
                    while data:
                        data = data[os.write(_fd, data):]

        threading.Thread(target=_send_loop, daemon=True).start()
    _pc = _time.perf_counter
    _kinds: dict = {}
    _roots: set = set()

    def _enter(id_, bound_args, instance=None, parent_id=None, tags=None, **kw):
        k = _kinds.get(type(instance))
        if k is None:
            k = _kinds[type(instance)] = type(instance).__name__
        if parent_id is None:
            _roots.add(id_)
            q = bound_args.arguments.get("str_or_query_bundle")
            _buf.append((0, id_, None, _pc(), k, id(instance), str(q)))
        else:
            _buf.append((0, id_, parent_id, _pc(), k, id(instance)))

    def _exit(id_, bound_args, instance=None, result=None, **kw):
        if id_ in _roots:
            _roots.discard(id_)
            _buf.append((1, id_, _pc(), str(getattr(result, "response", ""))))
            _queue.append(pickle.dumps(_buf, protocol=5))
            _buf.clear()
        else:
            _buf.append((1, id_, _pc()))

    def _handle(event, **kw):
        name = type(event).__name__
        d = event.__dict__
        if name == "LLMCompletionStartEvent":
            _buf.append((name, event.span_id, _pc(), d.get("prompt"), d.get("model_dict")))
        elif name == "LLMCompletionEndEvent":
            r = d.get("response")
            _buf.append((name, event.span_id, _pc(), r.text if r is not None else None,
                         r.additional_kwargs if r is not None else None))
        elif name == "EmbeddingEndEvent":
            _buf.append((name, event.span_id, _pc(), tuple(d.get("chunks") or ())))
        elif name == "RetrievalEndEvent":
            rows = [(n.node.node_id, n.score, n.node.get_content()[:300]) for n in d.get("nodes") or ()]
            _buf.append((name, event.span_id, _pc(), rows))
        elif name in ("EmbeddingStartEvent", "RetrievalStartEvent"):
            _buf.append((name, event.span_id, _pc()))

    replace_handlers(_enter, _exit, _handle)

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

if args.config == "diag-deferred":
    # Hypothesis test: the same observer, fed in one burst per request instead of call by call
    # (the calls are buffered with their times and replayed when the request's root exits).
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama import observer as _obs_mod
    from aim_llama.dispatcher import AimSpanHandler

    _obs = next(h.obs for h in get_dispatcher().span_handlers if isinstance(h, AimSpanHandler))
    _calls: list = []
    _rootset: set = set()
    _real_now = _obs_mod._now
    _pc2 = time.perf_counter
    _fake = [0.0]

    def _drain():
        enter, exit_, handle = _obs.span_enter, _obs.span_exit, _handle_real
        for c in _calls:
            _fake[0] = c[1]
            if c[0] == 0:
                enter(c[2], c[3], c[4], c[5])
            elif c[0] == 1:
                exit_(c[2], c[3], c[4], c[5])
            else:
                handle(c[2])
        _calls.clear()

    _obs_mod._now = lambda: _fake[0]

    def _enter2(id_, bound_args, instance=None, parent_id=None, tags=None, **kw):
        if parent_id is None:
            _rootset.add(id_)
        _calls.append((0, _pc2(), id_, bound_args, instance, parent_id))

    def _exit2(id_, bound_args, instance=None, result=None, **kw):
        _calls.append((1, _pc2(), id_, bound_args, instance, result))
        if id_ in _rootset:
            _rootset.discard(id_)
            _drain()

    from aim_llama.dispatcher import AimEventHandler
    _eh = next(h for h in get_dispatcher().event_handlers if isinstance(h, AimEventHandler))
    _handle_real = type(_eh).handle.__get__(_eh)

    def _handle2(event, **kw):
        _calls.append((2, _pc2(), event))

    for h in get_dispatcher().span_handlers + get_dispatcher().event_handlers:
        if isinstance(h, AimSpanHandler):
            h.__dict__["span_enter"] = _enter2
            h.__dict__["span_exit"] = _exit2
        if isinstance(h, AimEventHandler):
            h.__dict__["handle"] = _handle2
    _in_req = _obs.repeats_chunks
    _cur = _obs.current_sampled
    _obs.repeats_chunks = lambda: (_drain(), _in_req())[1]
    _obs.current_sampled = lambda: (_drain(), _cur())[1]

if args.config == "diag-discard":
    # Every record mapped as usual, then discarded at the hand-off: no writer process at all.
    from aim_llama import autoinstrument

    _active = autoinstrument._active
    assert _active is not None
    _active.handler.submit = lambda record: None
    _active.handler.submit_many = lambda records: None

for i in range(args.warmup):
    engine.query(question(i))
if AIM_LLAMA and args.config != "diag-discard":
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
