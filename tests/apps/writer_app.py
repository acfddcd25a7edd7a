"""Test app for the writer alone (no LlamaIndex): submit records, then end in a chosen way.

Usage: writer_app.py N_RECORDS MODE [--queue-size Q] [--flush-timeout T] [--backend B] [--threads K]
MODE: exit (normal exit right after submitting), flush-wait (flush, print FLUSHED, wait for stdin),
      sigterm-wait (print READY, sleep), app-handler (own SIGTERM handler exiting 7), kill-wait
      (flush half, submit the rest, print READY, sleep for SIGKILL), writer-dies (flush half,
      stop the writer process, submit the rest, kill it, submit 100 more, print ALIVE, exit
      normally), writer-dies-often (kill every writer process, MAX_RESTARTS + 1 times, with
      N records stored before each death),
      stopped-writer-exit (flush half, stop the writer process, submit the rest, exit normally),
      writer-stalls (flush, stop the writer process, fill its pipe exactly, exit normally),
      drops-then-dies (overflow the queue in bursts of N, flush, stop the writer process, send
      it 15 records, kill it, exit normally).
"""

import argparse
import os
import signal
import sys
import threading
import time

from aim_llama.aimrun import RunConfig
from aim_llama.records import Track
from aim_llama.writer import Writer

p = argparse.ArgumentParser()
p.add_argument("n", type=int)
p.add_argument("mode")
p.add_argument("--queue-size", type=int, default=50_000)
p.add_argument("--flush-timeout", type=float, default=10.0)
p.add_argument("--backend", default="process")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--text", action="store_true")
p.add_argument("--sigpipe-default", action="store_true", help="as `prog | head` programs do")
a = p.parse_args()
if a.sigpipe_default:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)

writer = Writer(
    RunConfig(repo=os.environ["AIM_REPO"], app_pid=os.getpid(), system_tracking_interval=None,
              log_system_params=False, version="test", writer=a.backend),
    queue_size=a.queue_size, flush_timeout=a.flush_timeout, backend=a.backend,
)

import atexit


def close_at_exit() -> None:
    started = time.monotonic()
    writer.close()
    print(f"CLOSE_TOOK {time.monotonic() - started:.3f}", flush=True)


atexit.register(close_at_exit)

if a.mode == "app-handler":
    def on_term(signum, frame):
        sys.stdout.write("APP HANDLER\n")
        sys.stdout.flush()
        os._exit(7)
    signal.signal(signal.SIGTERM, on_term)

if a.mode in ("sigterm-wait", "app-handler"):
    from aim_llama.lifecycle import SignalChain

    def on_signal(signum: int) -> bool:
        # As autoinstrument._on_signal: close (bounded by the flush timeout), then always
        # chain. Returning close()'s result would defer the signal forever after a slow close.
        writer.close()
        return True

    SignalChain(on_signal).install()


def submit(start: int, count: int, thread: int = 0) -> None:
    for i in range(start, start + count):
        if a.text:
            writer.submit(Track("note", f"record {i}", "text", {"kind": "t"}))
        else:
            writer.submit(Track("value", float(i), "metric", {"kind": f"t{thread}"}))


t0 = time.perf_counter()
if a.mode == "writer-dies":
    half = a.n // 2
    submit(0, half)
    assert writer.flush(60), "flush timed out"
    writer_pid = writer._backend.proc.pid
    os.kill(writer_pid, signal.SIGSTOP)  # received, never stored: sent into its pipe
    submit(half, a.n - half)
    time.sleep(0.5)
    os.kill(writer_pid, signal.SIGKILL)  # e.g. the OOM killer
    time.sleep(0.5)
    writer.submit(Track("value", -1.0, "metric", {"kind": "late"}))  # to the next writer
    for i in range(100):  # the same sequence as before the death: steps continue after it
        writer.submit(Track("value", 5000.0 + i, "metric", {"kind": "t0"}))
    # the first flush since the death says records were lost; the next one, that what came
    # after it is stored
    print("FLUSH_AFTER_DEATH", writer.flush(10), writer.flush(10), flush=True)
    print("RESTARTS", writer.restarts, flush=True)
    print("ALIVE", flush=True)
elif a.mode == "writer-dies-often":
    from aim_llama.writer import MAX_RESTARTS

    for death in range(MAX_RESTARTS + 1):
        submit(death * a.n, a.n)
        print("FLUSH", death, writer.flush(30), flush=True)
        backend = writer._backend
        os.kill(backend.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while writer._backend is backend and time.monotonic() < deadline:
            time.sleep(0.05)
    writer.submit(Track("value", -1.0, "metric", {"kind": "late"}))  # nobody takes it
    print("FLUSH_AFTER_LAST_DEATH", writer.flush(5), flush=True)
    print("RESTARTS", writer.restarts, flush=True)
elif a.mode == "drops-then-dies":
    for burst in range(5):  # drops, and a record of the drop count in several batches
        submit(burst * a.n, a.n)
        time.sleep(0.2)
    assert not writer.flush(60), "records were dropped: flush must say so"
    assert writer.flush(60), "flush timed out (or a loss since the previous flush)"
    writer_pid = writer._backend.proc.pid
    os.kill(writer_pid, signal.SIGSTOP)
    for i in range(15):  # handed to the stopped writer process: never stored
        writer.submit(Track("value", float(i), "metric", {"kind": "sent-to-dead"}))
    time.sleep(0.5)
    os.kill(writer_pid, signal.SIGKILL)
    time.sleep(0.5)
elif a.mode == "stopped-writer-exit":
    half = a.n // 2
    submit(0, half)
    assert writer.flush(60), "flush timed out"
    writer_pid = writer._backend.proc.pid
    os.kill(writer_pid, signal.SIGSTOP)  # a writer far behind (heavy load): records in the pipe
    submit(half, a.n - half)
    time.sleep(0.5)  # (handed to the pipe by the sender thread)
    print("WRITER", writer_pid, flush=True)
elif a.mode == "writer-stalls":
    import fcntl

    from aim_llama.wire import dumps

    submit(0, a.n)
    assert writer.flush(60), "flush timed out"
    backend = writer._backend
    print("STOPPED", backend.proc.pid, flush=True)
    os.kill(backend.proc.pid, signal.SIGSTOP)  # storage stuck: it reads nothing any more
    room = fcntl.fcntl(backend._fd, 1032) - 4  # F_GETPIPE_SZ, less the frame header
    size = room
    while len(dumps([Track("note", "x" * size, "text", {"kind": "t"})])) > room:
        size -= 1
    writer.submit(Track("note", "x" * size, "text", {"kind": "t"}))  # one frame, pipe full
    time.sleep(0.5)
elif a.mode == "kill-wait":
    half = a.n // 2
    submit(0, half)
    assert writer.flush(60), "flush timed out"
    print("FLUSHED", half, writer.run_hash, flush=True)
    submit(half, a.n - half)
elif a.threads > 1:
    per = a.n // a.threads
    ts = [threading.Thread(target=submit, args=(k * per, per, k)) for k in range(a.threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
else:
    submit(0, a.n)
print(f"SUBMITTED {a.n} in {time.perf_counter() - t0:.3f}s dropped={writer.dropped}", flush=True)

if a.mode == "flush-wait":
    ok = writer.flush(60)
    print("FLUSHED", ok, writer.run_hash, flush=True)
    sys.stdin.readline()
elif a.mode in ("sigterm-wait", "app-handler", "kill-wait"):
    writer_pid = 0  # (the writer process's, once it runs: a test may signal it too)
    deadline = time.monotonic() + 30
    while a.backend == "process" and not writer_pid and time.monotonic() < deadline:
        writer_pid = getattr(getattr(getattr(writer, "_backend", None), "proc", None), "pid", 0)
        time.sleep(0.01)
    print("READY", writer_pid, flush=True)
    time.sleep(60)
    print("NOT KILLED", flush=True)
print("EXITING", time.time(), flush=True)
