"""The writer: takes records from the application without ever blocking it, and stores them.

`submit_many()` is the hot path: a length check, the records pickled as plain tuples
(`wire.py`, a few microseconds) and a `deque.append` of the bytes (no lock, no I/O). Queued
records are bytes, not objects: the garbage collector never sees them, so a queue that fills between
two drains cannot trigger collections of the application's heap (with live record objects
it did: a full collection of a LlamaIndex process costs ~90 ms). A sender thread wakes every
`BATCH_INTERVAL` seconds, drains the queue and hands the chunks to a backend:

* `process` (default): a writer process (`python -m aim_llama.writer_process`) fed over a
  pipe. Aim's CPU cost (≈0.1 ms per `track()`) and the writer's formatting and redaction
  (`finish.py`) move off the application's interpreter and GIL, and the writer still
  finalizes the run if the application is killed.
* `thread`: the same `RunSink` in the sender thread. Used as a fallback when a process cannot
  be started, and for tests of the sink without a second process.

When the queue is full, records are dropped and counted; the count is tracked on the run
(`dropped_records`) and reported once. `flush()` and `close()` wait at most a timeout.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .aimrun import RunConfig, RunSink, track_dropped
from .lifecycle import sigpipe_as_error, start_background
from .log import warn_once
from .records import Flush, Record
from .wire import _MARK, count_records, dumps, loads_many

log = logging.getLogger("aim_llama")

BATCH_INTERVAL = 0.05
# A writer process that dies (the OOM killer, a crash in Aim) is replaced this many times per
# application process; a writer that keeps dying is not worth a fourth try.
MAX_RESTARTS = 3
MAX_BATCH = 2_000  # chunks (submit calls) per batch sent to the backend
_HEADER = struct.Struct(">I")
# Written by the writer process before its first acknowledgement: what its interpreter start-up
# printed on stdout before that (a `sitecustomize.py`, `usercustomize.py` or `.pth` banner) is
# skipped, never read as a frame.
ACK_SYNC = b"\0aim-llama acknowledgements\0"
CLOSE = ("close",)


class Backend(Protocol):
    """Where the sender thread puts batches: pickled lists of records (see `dumps`)."""

    def send(self, chunks: list[bytes]) -> None: ...

    def close(self, deadline: float) -> bool: ...


class ThreadBackend:
    """Stores batches in the calling (sender) thread through a `RunSink`."""

    def __init__(self, config: RunConfig, on_ack: Any, on_run: Any) -> None:
        self.sink = RunSink(config)
        self.sink.on_ack = on_ack  # aim:// repos: flush tokens are acknowledged once delivered
        if self.sink.address is not None:
            # Aim's client warns once per outage, without the address; the sink says it once,
            # with the address and what is kept (as the writer process does)
            logging.getLogger("aim.ext.transport").setLevel(logging.ERROR)
        self._on_ack = on_ack
        self._on_run = on_run

    def send(self, chunks: list[bytes]) -> None:
        tokens = self.sink.apply(loads_many(b"".join(chunks)))
        if self.sink.run_hash:
            self._on_run(self.sink.run_hash)
        for token in tokens:
            self._on_ack(token)

    def close(self, deadline: float) -> bool:
        self.sink.close(max(0.0, deadline - time.monotonic()))
        return True


def frame(obj: Any) -> bytes:
    """One length-prefixed pickle, as it travels over a pipe."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def write_frame(fd: int, obj: Any) -> None:
    """Send one length-prefixed pickle over a pipe."""
    write_raw_frame(fd, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def write_raw_frame(fd: int, data: bytes) -> None:
    """Send already pickled bytes (one pickle, or chunks of records) as one frame."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def wait_fd(fd: int, write: bool, timeout: float) -> bool:
    """Whether `fd` becomes readable (or writable) within `timeout` seconds; also True when
    its other end is gone (the next read or write says so). `poll`, not `select`: `select`
    cannot watch descriptors numbered 1024 and up, and a busy server has those."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def write_until(fd: int, data: bytes, deadline: float) -> bool:
    """Write `data` to a pipe unless `deadline` (monotonic) passes first: a pipe that is full
    because its reader is stuck must not hold the application past its flush timeout."""
    view = memoryview(data)
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        while view:
            if not wait_fd(fd, True, max(0.0, deadline - time.monotonic())):
                return False
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, blocking)


class Refused(NamedTuple):
    """What `read_frame` returns for a frame its `trusted` check turned down: never unpickled,
    its records only counted (from the chunk headers)."""

    records: int


# How every frame's payload starts: a pickle's PROTO opcode and version (a control message),
# or a chunk of records (`wire._MARK`, its record count and size, then such a pickle).
_PROTO = 0x80
_PICKLE_HEAD = bytes((_PROTO,))
_CHUNK_HEAD = bytes((_MARK,))
_CHUNK_START = struct.Struct(">BIIBB")


def _pickle_start(data: bytes) -> bool:
    return len(data) == 2 and data[0] == _PROTO and 2 <= data[1] <= pickle.HIGHEST_PROTOCOL


def read_frame(stream: Any, trusted: Callable[[], bool] | None = None) -> Any:
    """Read one frame from a binary stream; None at end of file. With `trusted`, the frame is
    unpickled only if it says yes (else `Refused`): unpickling runs code the sender chose."""
    header = _read_exact(stream, _HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    # Foreign bytes (a log line written into the pipe, read as a size) are said now, not
    # after gigabytes: the payload must start as aim-llama's do, read a byte or a few at a
    # time (a line of text ends soon).
    if size < 2:
        raise ValueError(f"not a frame aim-llama wrote: starts with {header!r}")
    head = _read_exact(stream, 1)
    if head == _PICKLE_HEAD:
        head += _read_exact(stream, 1)
        if len(head) < 2:
            return None
        ok = _pickle_start(head)
    elif head == _CHUNK_HEAD and size >= _CHUNK_START.size:
        head += _read_exact(stream, _CHUNK_START.size - 1)
        if len(head) < _CHUNK_START.size:
            return None
        _mark, _count, chunk, proto, version = _CHUNK_START.unpack(head)
        ok = chunk + _CHUNK_START.size - 2 <= size and _pickle_start(bytes((proto, version)))
    elif not head:
        return None
    else:
        ok = False
    if not ok:
        raise ValueError(f"not a frame aim-llama wrote: starts with {header + head!r}")
    data = head + _read_exact(stream, size - len(head))
    if len(data) < size:
        return None
    if trusted is not None and not trusted():
        return Refused(count_records(data))
    return loads_many(data)


def _read_exact(stream: Any, size: int) -> bytes:
    """Read `size` bytes (fewer only at end of file); raw pipes may return short reads."""
    data = stream.read(size) or b""
    while 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return bytes(data)


def _fd_id(fd: int) -> tuple[int, int] | None:
    """What file descriptor `fd` refers to now (device, inode), None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# Pipe objects whose descriptor numbers the application closed and may have reused: kept
# alive so that their garbage collection never closes what those numbers mean now.
_abandoned: list[Any] = []


# Held while `Popen` starts a writer process (milliseconds): an application thread that forks
# meanwhile (a multiprocessing pool) waits for it. Otherwise the forked child keeps `Popen`'s
# error pipe open, and Popen waits until that child exits: the application's records are not
# stored while its pool lives.
_spawning = threading.Lock()
_held_for_fork = False


def _before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _spawning.acquire(timeout=2.0)  # bounded: never a deadlocked fork


def _after_fork_in_parent() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _spawning.release()


def _after_fork_in_child() -> None:
    global _spawning, _held_for_fork
    _spawning = threading.Lock()  # whoever held it in the parent does not exist here
    _held_for_fork = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


# Interpreter options an application sets for itself that would break or clutter the writer
# process: `PYTHONWARNINGS=error::DeprecationWarning` made Aim's own import fail (no run at
# all), PYTHONINSPECT would leave it at an interactive prompt, the verbose and import-time
# traces would write to the application's stderr.
_APP_ONLY_PYTHON_ENV = ("PYTHONWARNINGS", "PYTHONINSPECT", "PYTHONVERBOSE",
                        "PYTHONPROFILEIMPORTTIME", "PYTHONDEVMODE", "PYTHONSTARTUP",
                        "PYTHONWARNDEFAULTENCODING", "PYTHONTRACEMALLOC", "PYTHONMALLOCSTATS",
                        "PYTHONMALLOC", "PYTHONASYNCIODEBUG")


def _above_stdio(pipe: Any, mode: str) -> Any:
    """`pipe` itself, or — when its descriptor is 0, 1 or 2 (closed at the app's start) — a
    raw file on a close-on-exec copy numbered 3 or more (the original number closed)."""
    fd = pipe.fileno()
    if fd > 2:
        return pipe
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    pipe.close()
    return open(moved, mode, buffering=0)  # (owned by the backend, like Popen's)


class ProcessBackend:
    """Feeds a writer process over its stdin and reads its acknowledgements from its stdout.

    No thread of its own: the sender thread polls for acknowledgements between batches and
    `close()` reads them in the caller. (From Python 3.12 no thread may start at interpreter
    shutdown, and a program may exit right after its first record.)
    """

    def __init__(self, config: RunConfig, on_ack: Any, on_run: Any) -> None:
        env = dict(os.environ)
        env["AIM_LLAMA_ENABLED"] = "false"  # the writer must never instrument itself
        env["AIM_LLAMA_ROLE"] = "writer"
        env.pop("__AIM_CLIENT_QUEUE_MAX_MEMORY__", None)  # breaks remote Runs (read as a string)
        for name in _APP_ONLY_PYTHON_ENV:  # the application's interpreter options, not ours
            env.pop(name, None)
        # The child must import this very copy of aim_llama, even if the app put it on sys.path
        # by hand: put its parent directory first.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        with _spawning:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aim_llama.writer_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                bufsize=0,  # raw pipes: no buffered-reader lock a forked child could inherit held
                env=env,
                start_new_session=True,  # group signals (Ctrl-C, kill -TERM -pgid) go to the app only
                close_fds=True,
            )
            assert self.proc.stdin is not None and self.proc.stdout is not None
            # An application started with stdin / stdout / stderr closed would have our pipes
            # take those numbers: its writes to "stdout" (a C library's, a `print`) would land
            # in the writer's protocol. Our ends move above them — under the lock, so that a
            # child forked meanwhile never has them at those numbers.
            self.proc.stdin = _above_stdio(self.proc.stdin, "wb")
            self.proc.stdout = _above_stdio(self.proc.stdout, "rb")
        self._fd = self.proc.stdin.fileno()
        self._ack_fd = self.proc.stdout.fileno()
        self._buf = b""
        self._synced = False  # ACK_SYNC seen
        self._eof = False  # the writer process closed its end (exited or died)
        self._on_ack = on_ack
        self._on_run = on_run
        self.closed_info: tuple[Any, ...] | None = None
        self.stored = 0  # records the writer process reported in the repo (or on the server)
        self.writer_lost = 0  # records the writer process reported lost (a server's buffer bound …)
        self.broken = False
        # An application that closes every descriptor (a hand-rolled daemonization) and opens
        # new ones may be given these numbers back: never read, write or close them then.
        self._pipe_ids = {fd: _fd_id(fd) for fd in (self._fd, self._ack_fd)}  # those still ours
        self.lost_pipes = False
        write_frame(self._fd, config)

    def _pipes_ok(self) -> bool:
        """False (for good) once either pipe number no longer means our pipe."""
        if self.lost_pipes:
            return False
        if all(_fd_id(fd) == known for fd, known in self._pipe_ids.items()):
            return True
        self.lost_pipes = self.broken = self._eof = True
        _abandoned.append((self.proc.stdin, self.proc.stdout))
        self.proc.stdin = self.proc.stdout = None
        return False

    @property
    def eof(self) -> bool:
        """True once the writer process has closed its acknowledgement pipe."""
        return self._eof

    def poll(self, timeout: float = 0.0) -> None:
        """Handle every acknowledgement that arrives within `timeout` seconds (0: what is there)."""
        deadline = time.monotonic() + timeout
        if not self._eof:
            self._pipes_ok()
        while not self._eof:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready = wait_fd(self._ack_fd, False, left)
            except (OSError, ValueError):
                self._eof = True
                break
            if not ready or not self._pipes_ok():  # (the number may have changed meanwhile)
                break
            try:
                chunk = os.read(self._ack_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
            self._dispatch()

    def _dispatch(self) -> None:
        if not self._synced:
            at = self._buf.find(ACK_SYNC)
            if at < 0:  # start-up output so far: keep only what may begin the marker
                self._buf = self._buf[-(len(ACK_SYNC) - 1):]
                return
            self._buf = self._buf[at + len(ACK_SYNC):]
            self._synced = True
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack(self._buf[: _HEADER.size])
            if len(self._buf) < _HEADER.size + size:
                return
            msg = pickle.loads(self._buf[_HEADER.size : _HEADER.size + size])
            self._buf = self._buf[_HEADER.size + size :]
            if msg[0] == "ack":
                self._on_ack(msg[1])
            elif msg[0] == "stored":
                self.stored = max(self.stored, int(msg[1]))
            elif msg[0] == "lost":
                self.writer_lost = max(self.writer_lost, int(msg[1]))
            elif msg[0] == "run":
                self._on_run(msg[1])
            elif msg[0] == "closed":
                self.closed_info = tuple(msg[1:])
                self.stored = max(self.stored, int(msg[1]))

    def send(self, chunks: list[bytes]) -> None:
        if self.broken or not self._pipes_ok():
            raise BrokenPipeError("writer process is gone")
        try:
            write_raw_frame(self._fd, b"".join(chunks))
        except OSError:
            self.broken = True
            raise
        self.poll()

    @property
    def died(self) -> bool:
        """The writer process is gone without having reported its run finalized."""
        return self.closed_info is None and self.proc.poll() is not None

    def close(self, deadline: float) -> bool:
        try:
            if self._pipes_ok() and not self.broken and self.proc.poll() is None:
                close = frame((*CLOSE, max(0.0, deadline - time.monotonic())))
                with sigpipe_as_error():  # called on the application's thread
                    write_until(self._fd, close, deadline)
            if self.proc.stdin is not None:
                self._pipe_ids.pop(self._fd, None)  # closed by us: no longer ours to check
                self.proc.stdin.close()
        except OSError:
            pass
        while self.closed_info is None and not self._eof and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        if self.closed_info is not None:
            # The run is finalized and its data written: the writer's own interpreter teardown
            # (Aim, RocksDB; ~0.5 s) goes on without the application waiting for it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.05)
            return True
        try:
            self.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return False


class Writer:
    """Application-side facade: bounded queue, drop accounting, flush/close with timeouts.

    `flush_timeout` defaults to the config's; one given here replaces it in the config too, so
    the writer process bounds its own waits by the same deadline as the application.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        queue_size: int = 50_000,
        flush_timeout: float | None = None,
        backend: str = "process",
    ) -> None:
        if flush_timeout is None:
            flush_timeout = config.flush_timeout
        elif flush_timeout != config.flush_timeout:  # the writer's own deadlines follow it too
            config = dataclasses.replace(config, flush_timeout=flush_timeout)
        self.config = config
        self.queue_size = queue_size
        self.flush_timeout = flush_timeout
        self.backend_name = backend
        self.run_hash: str | None = None
        self.dropped = 0
        self.lost = 0
        self.after_close = 0  # records made after close(): not stored, said once
        self._after_close_reported = False
        self._sent = 0  # records handed to the backend
        self._inflight = 0  # records being handed to it now (a write to a full pipe may block)
        self._flush_mark = (0, 0, 0)  # `_losses()` when the last flush returned
        self._sent_token = 0  # the last flush token handed to the backend
        self.restarts = 0  # writer processes started again after one died
        # (records in the chunk, pickled chunk), or a flush barrier. A tuple of an int and
        # bytes leaves the garbage collector's lists at the first collection that sees it.
        self._queue: collections.deque[tuple[int, bytes] | Flush] = collections.deque()
        # Records queued = submitted - drained (the sender alone advances `_drained`).
        self._submitted = 0
        self._drained = 0
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
        self._ack_lock = threading.Lock()
        self._reported_drops = 0
        self._close_deadline = 0.0
        self._close_ok = False
        self.closing_in: int | None = None  # thread id running close(), for signal handlers
        self._close_done = threading.Event()
        self._pid = os.getpid()

    # -- hot path -----------------------------------------------------------------------
    def submit(self, record: Record) -> None:
        """Queue a record for storage; never blocks; drops (and counts) when the queue is full."""
        self.submit_many([record])

    def submit_many(self, records: list[Record]) -> None:
        """Queue records for storage (one pickled chunk); never blocks; drops when full."""
        n = len(records)
        if not n:
            return
        if self._closed:
            self._after_close(n)
            return
        if self._submitted - self._drained + n > self.queue_size:
            self._drop(n)
            return
        try:
            data = dumps(records)
        except Exception as exc:  # a value that cannot be pickled: lose this chunk only
            self.lost += n
            warn_once(f"unpicklable:{type(exc).__name__}",
                      "could not queue %d records for Aim (%s: %s); they are lost", n,
                      type(exc).__name__, exc)
            return
        self._queue.append((n, data))
        self._submitted += n
        if not self._started:
            self._start()

    def _after_close(self, n: int) -> None:
        self.after_close += n
        if self.after_close == n:
            warn_once(
                "after-close",
                "records made after aim-llama's writer was closed (at exit, SIGTERM or "
                "uninstrument()) are not stored (at exit: atexit handlers run last-registered "
                "first, so one registered before LlamaIndex was instrumented runs after the "
                "run is finalized)",
            )

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self.dropped == n:
            warn_once(
                "queue-full",
                "the record queue is full (%d records: setting queue_size, AIM_LLAMA_QUEUE_SIZE); dropping "
                "records instead of slowing the application; the count is tracked as "
                "'dropped_records' on the run",
                self.queue_size,
            )

    @property
    def queued(self) -> int:
        """Records waiting in the queue (approximate while other threads submit)."""
        return max(0, self._submitted - self._drained)

    # -- machinery ----------------------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._thread = threading.Thread(
                target=self._sender, name="aim-llama-writer", daemon=True
            )
            self._started = True
            try:
                start_background(self._thread)
            except RuntimeError as exc:  # interpreter shutdown (Python >= 3.12): no new thread
                self._thread = None
                warn_once("writer-start", "cannot start the Aim writer: %s; recording is off", exc)

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
        # Never waits for the condition's lock: a signal handler may have interrupted
        # `flush()` on the main thread while it held it; the waiters poll `_acked` as well.
        with self._ack_lock:  # acks come from the writer thread and Aim's marker thread
            self._acked = max(self._acked, token)
        if self._ack_cond.acquire(blocking=False):
            try:
                self._ack_cond.notify_all()
            finally:
                self._ack_cond.release()

    def _drain(self) -> tuple[list[bytes], int, list[int]]:
        """Up to `MAX_BATCH` chunks: (chunks, records in them, flush tokens among them)."""
        chunks: list[bytes] = []
        tokens: list[int] = []
        records = 0
        queue = self._queue
        try:
            for _ in range(MAX_BATCH):
                item = queue.popleft()
                if isinstance(item, Flush):
                    tokens.append(item.token)
                    chunks.append(dumps([item]))
                else:
                    records += item[0]
                    chunks.append(item[1])
        except IndexError:
            pass
        self._drained += records
        if self.dropped != self._reported_drops:
            self._reported_drops = self.dropped
            chunks.append(dumps([track_dropped(self.dropped)]))
            records += 1  # not from the queue, but sent and stored like the others
        return chunks, records, tokens

    def _sender(self) -> None:
        try:
            self._backend = self._make_backend()
        except Exception as exc:
            warn_once("writer-start", "cannot start the Aim writer: %s; recording is off", exc)
            self._backend = None
        while True:
            stopping = self._stop
            chunks, records, tokens = self._drain()
            if chunks:
                self._send(chunks, records, tokens)
                if len(chunks) >= MAX_BATCH:
                    continue
            if stopping:
                if isinstance(self._backend, ThreadBackend):
                    # Close from this thread: at interpreter shutdown no new thread may start
                    # (Python >= 3.12), and the caller's join bounds the wait.
                    try:
                        self._close_ok = self._backend.close(self._close_deadline)
                    except Exception as exc:
                        warn_once("writer-close", "could not finalize the Aim run: %s", exc)
                return
            backend = self._backend
            if isinstance(backend, ProcessBackend) and not backend.eof:
                backend.poll(BATCH_INTERVAL)  # take acknowledgements while the interval passes
                if backend.eof and backend.closed_info is None and not self._stop:
                    self._backend = self._writer_died(backend)
                elif backend.eof and not self._stop:
                    self._finished_early(backend)
            else:
                self._wake.wait(BATCH_INTERVAL)
            self._wake.clear()

    def _send(self, chunks: list[bytes], records: int, tokens: list[int],
              retry: bool = True) -> None:
        try:
            self._send_now(chunks, records, tokens, retry)
        finally:
            self._inflight = 0

    def _send_now(self, chunks: list[bytes], records: int, tokens: list[int],
                  retry: bool) -> None:
        backend = self._backend
        if backend is not None:
            self._inflight = records
            try:
                backend.send(chunks)
                self._sent += records
                if tokens:
                    self._sent_token = max(tokens)
                return
            except Exception as exc:
                if isinstance(backend, ProcessBackend) and backend.closed_info is None:
                    backend.poll()  # its last words, if any
                    self._backend = self._writer_died(backend)
                    if self._backend is not None and retry:
                        # this batch never reached the dead writer: the new one takes it
                        self._send(chunks, records, tokens, retry=False)
                        return
                else:
                    if isinstance(backend, ProcessBackend) and backend.closed_info:
                        self._finished_early(backend)
                    warn_once("writer-send",
                              "the Aim writer failed (%s); further records are lost", exc)
                self._backend = None
        self.lost += records
        for token in tokens:
            self._ack(token)

    def _finished_early(self, backend: ProcessBackend) -> None:
        """The writer process finalized the run before being asked to (a frame it could not
        read ended its input): what it was sent after that was never received, and is lost;
        flushes waiting for it are answered (and fail), later records are counted lost."""
        self._count_unreceived(backend)
        self._backend = None
        self._ack(self._sent_token)

    def _count_unreceived(self, backend: ProcessBackend) -> None:
        """A writer process that reported its run closed: what it reported lost, or — when a
        frame it could not read ended its input — what was sent and never received."""
        assert backend.closed_info is not None
        stored, lost = int(backend.closed_info[0]), int(backend.closed_info[1])
        self.lost += max(lost, self._sent - stored)
        self._sent = stored

    def _writer_died(self, backend: ProcessBackend, restart: bool = True
                     ) -> ProcessBackend | None:
        """The writer process went away (or the application closed our pipes to it): what it
        received but never reported stored is lost. Returns the writer process that takes
        over (the same run, continued), if one could be started."""
        unstored = max(0, self._sent - backend.stored)
        self._sent = backend.stored
        self.lost += unstored
        # flushes waiting for what the dead writer had received: answered (and failed, since
        # `lost` grew); flushes still queued go to the next writer
        self._ack(self._sent_token)
        if backend.lost_pipes:
            warn_once("writer-pipes",
                      "the application closed aim-llama's pipes to its writer process "
                      "(descriptors %d and %d): %d records the writer had not reported stored "
                      "and every later record are lost (aim-llama leaves those descriptor "
                      "numbers alone from now on)", backend._fd, backend._ack_fd, unstored)
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            backend.proc.wait(timeout=1.0)
        status = backend.proc.returncode
        how = ("still running" if status is None else f"killed by signal {-status}" if status < 0
               else f"exit status {status}")
        successor = self._restart() if restart else None
        if successor is not None:
            log.warning(
                "the Aim writer process (pid %d) ended unexpectedly (%s): %d records it had "
                "received were not stored; a new writer process (pid %d) continues run %s "
                "(restart %d of at most %d)",
                backend.proc.pid, how, unstored, successor.proc.pid, self.run_hash or "(new)",
                self.restarts, MAX_RESTARTS,
            )
            return successor
        warn_once(
            f"writer-died:{self.restarts}",
            "the Aim writer process (pid %d) ended unexpectedly (%s): %d records it had received "
            "were not stored, and later records are lost%s",
            backend.proc.pid, how, unstored,
            f" (it was restarted {MAX_RESTARTS} times already)" if self.restarts >= MAX_RESTARTS
            else "",
        )
        return None

    def _restart(self) -> ProcessBackend | None:
        """A new writer process continuing this writer's run, unless closing, in a forked
        child, or out of restarts."""
        if self._stop or self.restarts >= MAX_RESTARTS or os.getpid() != self._pid:
            return None
        self.restarts += 1
        config = dataclasses.replace(self.config, run_hash=self.run_hash)
        try:
            backend = ProcessBackend(config, self._ack, self._set_run)
        except Exception as exc:
            warn_once("writer-restart", "cannot start a new writer process (%s: %s)",
                      type(exc).__name__, exc)
            return None
        self._sent = 0  # what the new writer reports stored counts from zero
        return backend

    def _report_after_close(self) -> None:
        """A later close() (the exit hook after SIGTERM's): how many records came too late."""
        if self.after_close and not self._after_close_reported:
            self._after_close_reported = True
            log.warning("%d records made after aim-llama's writer was closed were not stored",
                        self.after_close)

    def _report_close(self, ok: bool, limit: float, pending: int, unconfirmed: int) -> None:
        """Say what did not make it into the repo; silence means everything did."""
        backend = self._backend
        if not ok:
            if isinstance(backend, ProcessBackend):
                remote = "://" in (self.config.repo or "")
                running = backend.proc.poll() is None
                where = (f"; {unconfirmed} more were handed to the writer process (pid "
                         f"{backend.proc.pid}) and not yet confirmed stored: "
                         + ("it reports itself which of them it could not deliver to the "
                            "server" if remote else
                            "it goes on storing them" if running else "it has ended"))
            else:
                where = " (plus any batch the writer thread was storing)"
            log.warning(
                "the Aim writer did not finish within the flush timeout (%gs, "
                "AIM_LLAMA_FLUSH_TIMEOUT): %d records not handed to it%s; %d dropped earlier "
                "because the queue was full",
                limit,
                pending,
                where,
                self.dropped,
            )
        elif self.lost or self.dropped:
            log.warning(
                "Aim writer closed: %d records could not be stored, %d dropped because the queue "
                "was full (queue_size = %d)",
                self.lost,
                self.dropped,
                self.queue_size,
            )

    # -- public control -----------------------------------------------------------------
    def _losses(self) -> tuple[int, int, int]:
        """(lost here, dropped at the queue, lost in the writer) so far."""
        backend = self._backend
        if isinstance(backend, ProcessBackend):
            inside = backend.writer_lost
        elif isinstance(backend, ThreadBackend):
            inside = backend.sink.lost
        else:
            inside = 0
        return self.lost, self.dropped, inside

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is stored; False if `timeout` ran out
        first, or if records were dropped or lost since the previous flush (a full queue, a
        server's buffer bound, a writer that died or failed)."""
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
                self._ack_cond.wait(min(left, 0.05))  # `_ack` may not get the lock to notify
        before, self._flush_mark = self._flush_mark, self._losses()
        return self._flush_mark == before

    def close(self, timeout: float | None = None) -> bool:
        """Store everything queued, finalize the run, within `timeout`; report what was lost."""
        if self._closed:
            closing_in = self.closing_in
            if closing_in is not None and closing_in != threading.get_ident():
                # Another thread is closing (e.g. `uninstrument()` when SIGTERM arrives): the
                # caller goes on only once the run is finalized, within the same bound.
                self._close_done.wait(self.flush_timeout if timeout is None else timeout)
            self._report_after_close()
            return True
        self.closing_in = threading.get_ident()  # before `_closed`: see above
        self._closed = True
        try:
            if not self._started or os.getpid() != self._pid:
                return True
            return self._close(timeout)
        finally:
            self.closing_in = None
            self._close_done.set()

    def _close(self, timeout: float | None) -> bool:
        limit = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._close_deadline = deadline
        self._stop = True
        self._wake.set()
        thread = self._thread
        threaded = isinstance(self._backend, ThreadBackend)
        # The thread writer needs a moment at the end to leave Aim's native code cleanly.
        margin = min(0.5, limit / 4) if threaded else 0.0
        if thread is None:  # the writer never ran: everything queued is lost, and said so
            pending = self.queued
            if pending:
                log.warning("the Aim writer never started: %d records not written", pending)
            return pending == 0
        thread.join(max(0.0, deadline - margin - time.monotonic()))
        ok = not thread.is_alive()
        pending = 0
        given_up = False
        if not ok and isinstance(self._backend, ThreadBackend) and thread is not None:
            # Out of time: make the writer thread leave Aim's native code between records (the
            # interpreter must not tear down under it: that can crash the process at exit); it
            # then finalizes what it stored and counts the rest.
            self._backend.sink.abort = True
            thread.join(max(0.05, deadline - time.monotonic()))
            if not thread.is_alive() and self._backend.sink.address is not None and not self.queued:
                # It left a server it had been waiting for, in time: as when given up on
                # below, the sink has reported that server and this is its loss, not a timeout.
                given_up = True
            elif not thread.is_alive():
                pending += self._backend.sink.lost
            elif self._backend.sink.address is not None:
                # Still waiting for a server: what it holds is lost with the process; the sink
                # counts and reports it once (as it does when its own exit deadline passes),
                # the batch it is still taking (stuck opening the run, say) included.
                self._backend.sink.give_up(received=self._sent + self._inflight)
                given_up = True
        if given_up and isinstance(self._backend, ThreadBackend):
            self.lost += self._backend.sink.lost
            ok = True  # not a slow writer: a server given up on, its loss counted below
        elif ok and isinstance(self._backend, ThreadBackend):
            ok = self._close_ok  # the writer thread closed the run on its way out
            self.lost += self._backend.sink.lost
        elif ok and self._backend is not None:
            backend = self._backend
            ok = backend.close(deadline)
            if isinstance(backend, ProcessBackend):
                if backend.closed_info:
                    self._count_unreceived(backend)
                elif backend.died:
                    self._writer_died(backend, restart=False)
                    ok = True  # not a timeout: the loss is counted and reported below
        pending += self.queued
        unconfirmed = 0
        if ok and pending:
            # left here by a writer that has finished, or a server given up on: lost, and said
            self.lost += pending
            pending = 0
        elif not ok and isinstance(self._backend, ProcessBackend):
            pending += self._inflight  # a batch stuck in a write to the writer's full pipe
            unconfirmed = max(0, self._sent - self._backend.stored)
        self._report_close(ok, limit, pending, unconfirmed)
        return ok
