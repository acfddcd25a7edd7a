"""The writer: takes records from the application without ever blocking it, and stores them.

`submit()` is the hot path: a length check and a `deque.append` (no lock, no I/O). A sender
thread wakes every `BATCH_INTERVAL` seconds, drains the queue and hands the batch to a
backend:

* `process` (default): a writer process (`python -m aim_llama.writer_process`) fed over a
  pipe. Aim's CPU cost (≈0.1 ms per `track()`) moves off the application's interpreter and
  GIL, and the writer still finalizes the run if the application is killed.
* `thread`: the same `RunSink` in the sender thread. Used as a fallback when a process cannot
  be started, and for tests of the sink without a second process.

When the queue is full, records are dropped and counted; the count is tracked on the run
(`dropped_records`) and reported once. `flush()` and `close()` wait at most a timeout.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

from .aimrun import RunConfig, RunSink, track_dropped
from .log import warn_once
from .records import Flush, Record

log = logging.getLogger("aim_llama")

BATCH_INTERVAL = 0.05
MAX_BATCH = 2_000
_HEADER = struct.Struct(">I")
CLOSE = ("close",)


class Backend(Protocol):
    """Where the sender thread puts batches."""

    def send(self, batch: list[Record]) -> None: ...

    def close(self, deadline: float) -> bool: ...


class ThreadBackend:
    """Stores batches in the calling (sender) thread through a `RunSink`."""

    def __init__(self, config: RunConfig, on_ack: Any, on_run: Any) -> None:
        self.sink = RunSink(config)
        self.sink.on_ack = on_ack  # aim:// repos: flush tokens are acknowledged once delivered
        self._on_ack = on_ack
        self._on_run = on_run

    def send(self, batch: list[Record]) -> None:
        tokens = self.sink.apply(batch)
        if self.sink.run_hash:
            self._on_run(self.sink.run_hash)
        for token in tokens:
            self._on_ack(token)

    def close(self, deadline: float) -> bool:
        self.sink.close(max(0.0, deadline - time.monotonic()))
        return True


def write_frame(fd: int, obj: Any) -> None:
    """Send one length-prefixed pickle over a pipe."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_frame(stream: Any) -> Any:
    """Read one frame from a binary stream; None at end of file."""
    header = _read_exact(stream, _HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read_exact(stream, size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def _read_exact(stream: Any, size: int) -> bytes:
    """Read `size` bytes (fewer only at end of file); raw pipes may return short reads."""
    data = stream.read(size) or b""
    while 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return bytes(data)


class ProcessBackend:
    """Feeds a writer process over its stdin; a reader thread collects its acknowledgements."""

    def __init__(self, config: RunConfig, on_ack: Any, on_run: Any) -> None:
        env = dict(os.environ)
        env["AIM_LLAMA_ENABLED"] = "false"  # the writer must never instrument itself
        env["AIM_LLAMA_ROLE"] = "writer"
        env.pop("__AIM_CLIENT_QUEUE_MAX_MEMORY__", None)  # breaks remote Runs (read as a string)
        # The child must import this very copy of aim_llama, even if the app put it on sys.path
        # by hand: put its parent directory first.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aim_llama.writer_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,  # raw pipes: a buffered reader's lock held by the ack thread hangs a forked child
            env=env,
            start_new_session=True,  # group signals (Ctrl-C, kill -TERM -pgid) go to the app only
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._fd = self.proc.stdin.fileno()
        self._on_ack = on_ack
        self._on_run = on_run
        self.closed_info: tuple[Any, ...] | None = None
        self._closed = threading.Event()
        self.broken = False
        write_frame(self._fd, config)
        self._reader = threading.Thread(target=self._read_loop, name="aim-llama-acks", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        stdout = self.proc.stdout
        try:
            while True:
                msg = read_frame(stdout)
                if msg is None:
                    break
                if msg[0] == "ack":
                    self._on_ack(msg[1])
                elif msg[0] == "run":
                    self._on_run(msg[1])
                elif msg[0] == "closed":
                    self.closed_info = tuple(msg[1:])
        except Exception as exc:  # pragma: no cover - defensive
            log.debug("writer ack reader stopped: %s", exc)
        finally:
            self._closed.set()

    def send(self, batch: list[Record]) -> None:
        if self.broken:
            raise BrokenPipeError("writer process is gone")
        try:
            write_frame(self._fd, batch)
        except OSError:
            self.broken = True
            raise

    def close(self, deadline: float) -> bool:
        try:
            if not self.broken:
                write_frame(self._fd, (*CLOSE, max(0.0, deadline - time.monotonic())))
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        done = self._closed.wait(max(0.0, deadline - time.monotonic()))
        try:
            self.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return done and self.closed_info is not None


class Writer:
    """Application-side facade: bounded queue, drop accounting, flush/close with timeouts."""

    def __init__(
        self,
        config: RunConfig,
        *,
        queue_size: int = 50_000,
        flush_timeout: float = 10.0,
        backend: str = "process",
    ) -> None:
        self.config = config
        self.queue_size = queue_size
        self.flush_timeout = flush_timeout
        self.backend_name = backend
        self.run_hash: str | None = None
        self.dropped = 0
        self.lost = 0
        self._queue: collections.deque[Record] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._started = False
        self._closed = False
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._backend: Backend | None = None
        self._tokens = itertools.count(1)
        self._acked = 0
        self._ack_cond = threading.Condition()
        self._reported_drops = 0
        self._pid = os.getpid()

    # -- hot path -----------------------------------------------------------------------
    def submit(self, record: Record) -> None:
        """Queue a record for storage; never blocks; drops (and counts) when the queue is full."""
        if self._closed:
            self.dropped += 1
            return
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            if self.dropped == 1:
                warn_once(
                    "queue-full",
                    "the record queue is full (%d records, AIM_LLAMA_QUEUE_SIZE); dropping "
                    "records instead of slowing the application; the count is tracked as "
                    "'dropped_records' on the run",
                    self.queue_size,
                )
            return
        self._queue.append(record)
        if not self._started:
            self._start()

    # -- machinery ----------------------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._thread = threading.Thread(
                target=self._sender, name="aim-llama-writer", daemon=True
            )
            self._started = True
            self._thread.start()

    def _make_backend(self) -> Backend:
        if self.backend_name == "process":
            try:
                return ProcessBackend(self.config, self._ack, self._set_run)
            except Exception as exc:
                warn_once(
                    "writer-process",
                    "cannot start the writer process (%s); writing from a thread instead",
                    exc,
                )
                self.backend_name = "thread"
        return ThreadBackend(self.config, self._ack, self._set_run)

    def _set_run(self, run_hash: str) -> None:
        if self.run_hash is None:
            self.run_hash = run_hash

    def _ack(self, token: int) -> None:
        with self._ack_cond:
            self._acked = max(self._acked, token)
            self._ack_cond.notify_all()

    def _drain(self) -> list[Record]:
        batch: list[Record] = []
        queue = self._queue
        try:
            for _ in range(MAX_BATCH):
                batch.append(queue.popleft())
        except IndexError:
            pass
        if self.dropped != self._reported_drops:
            self._reported_drops = self.dropped
            batch.append(track_dropped(self.dropped))
        return batch

    def _sender(self) -> None:
        try:
            self._backend = self._make_backend()
        except Exception as exc:
            warn_once("writer-start", "cannot start the Aim writer: %s; recording is off", exc)
            self._backend = None
        while True:
            stopping = self._stop
            batch = self._drain()
            if batch:
                self._send(batch)
                if len(batch) >= MAX_BATCH:
                    continue
            if stopping:
                return
            self._wake.wait(BATCH_INTERVAL)
            self._wake.clear()

    def _send(self, batch: list[Record]) -> None:
        if self._backend is None:
            self.lost += sum(1 for r in batch if not isinstance(r, Flush))
            for r in batch:
                if isinstance(r, Flush):
                    self._ack(r.token)
            return
        try:
            self._backend.send(batch)
        except Exception as exc:
            warn_once("writer-send", "the Aim writer failed (%s); further records are lost", exc)
            self.lost += sum(1 for r in batch if not isinstance(r, Flush))
            self._backend = None
            for r in batch:
                if isinstance(r, Flush):
                    self._ack(r.token)

    def _report_close(self, ok: bool, limit: float, pending: int) -> None:
        """Say what did not make it into the repo; silence means everything did."""
        backend = self._backend
        if not ok:
            background = isinstance(backend, ProcessBackend) and backend.proc.poll() is None
            log.warning(
                "the Aim writer did not finish within the flush timeout (%gs, "
                "AIM_LLAMA_FLUSH_TIMEOUT): %d records not written%s; %d dropped earlier because "
                "the queue was full",
                limit,
                pending,
                f" (the writer process, pid {backend.proc.pid}, goes on storing what it already "
                "received)" if background and isinstance(backend, ProcessBackend)
                else " (plus any batch the writer thread was storing)",
                self.dropped,
            )
        elif self.lost or self.dropped:
            log.warning(
                "Aim writer closed: %d records could not be stored, %d dropped because the queue "
                "was full (AIM_LLAMA_QUEUE_SIZE=%d)",
                self.lost,
                self.dropped,
                self.queue_size,
            )

    # -- public control -----------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is stored; False if `timeout` ran out first."""
        if not self._started or self._closed:
            return True
        token = next(self._tokens)
        self._queue.append(Flush(token))
        self._wake.set()
        limit = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._ack_cond:
            while self._acked < token:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Store everything queued, finalize the run, within `timeout`; report what was lost."""
        if self._closed:
            return True
        self._closed = True
        if not self._started or os.getpid() != self._pid:
            return True
        limit = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        ok = thread is None or not thread.is_alive()
        pending = 0
        if not ok and isinstance(self._backend, ThreadBackend) and thread is not None:
            # Out of time: make the writer thread leave Aim's native code between records, so the
            # interpreter does not tear down under it (that can crash the process at exit).
            self._backend.sink.abort = True
            thread.join(1.0)
            if not thread.is_alive():
                self._backend.sink.close()  # finalize what was stored; the rest is reported below
                pending += self._backend.sink.lost
        if ok and self._backend is not None:
            ok = self._backend.close(deadline)
            if isinstance(self._backend, ProcessBackend) and self._backend.closed_info:
                self.lost += int(self._backend.closed_info[1])
            elif isinstance(self._backend, ThreadBackend):
                self.lost += self._backend.sink.lost
        pending += sum(1 for r in self._queue if not isinstance(r, Flush))
        self._report_close(ok, limit, pending)
        return ok
