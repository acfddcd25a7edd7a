"""Entry point of the writer process: `python -m aim_llama.writer_process`.

Reads length-prefixed pickled frames from stdin (first a `RunConfig`, then batches of
records, then a close request or end of file), stores them through a `RunSink`, and writes
acknowledgements to the original stdout. It finalizes the run when the application closes
the pipe, asks it to, or dies, so a SIGKILLed application still leaves a finished run.

It never lives forever: once the application has closed the pipe (or died), a watchdog gives
the writer a deadline — the application's remaining flush timeout for an aim:// server, whose
`close()` blocks forever when the server is gone, and a generous grace period for a local repo.
At the deadline it reports how many records were lost and leaves with `os._exit`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

POLL_INTERVAL = 0.25  # seconds between idle-time retries of an unreachable server
INBOX_BATCHES = 4  # batches read ahead of the sink; beyond that the pipe pushes back on the app
# Batches arriving within this many seconds are stored together (unless one carries a flush
# request, or the application is leaving): Aim's per-sequence summary keys and RocksDB's
# commits are then paid once per half second of records instead of once per 50 ms batch.
COALESCE = 0.5
MAX_COALESCED = 20_000  # records stored together at most


def local_grace(flush_timeout: float) -> float:
    """How long a writer for a local repo may go on storing after the application left."""
    return max(60.0, 6.0 * flush_timeout)


def margin(budget: float) -> float:
    """Time kept back so the application receives our report before its own deadline."""
    return min(0.5, 0.25 * budget)


class _Channel:
    """The acknowledgement pipe to the application, shared by several threads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, msg: tuple[Any, ...]) -> None:
        from .writer import write_frame

        if not self.lock.acquire(timeout=1.0):
            return
        try:
            write_frame(self.fd, msg)
        except OSError:
            pass  # the application is gone; keep storing what we have
        finally:
            self.lock.release()


class _Shutdown:
    """When the writer must be done: set once, by a close request, end of file or the app's death."""

    def __init__(self, flush_timeout: float, is_remote: bool) -> None:
        self.flush_timeout = flush_timeout
        self.is_remote = is_remote
        self.deadline: float | None = None
        self.slack = 0.0
        self.lock = threading.Lock()
        self.started = threading.Event()

    def begin(self, app_budget: float | None) -> None:
        """Start the countdown; `app_budget` is how long the application still waits for us."""
        with self.lock:
            if self.deadline is not None:
                return
            budget = self.flush_timeout if app_budget is None else max(0.0, app_budget)
            if self.is_remote:
                self.slack = margin(budget) / 2
                budget -= margin(budget)
            else:
                budget = max(budget, local_grace(self.flush_timeout))
            self.deadline = time.monotonic() + budget
            self.started.set()

    def left(self) -> float:
        """Seconds until the deadline (a large number before shutdown started)."""
        if self.deadline is None:
            return 1e9
        return self.deadline - time.monotonic()


def _same_user_as_parent() -> Callable[[], bool] | None:
    """For a writer running as root: a check that the application still runs as the users it
    ran as when it started us. Records are pickles, and unpickling runs code the sender chose:
    an application that dropped root privileges must not be able to run code as root through
    us. None (no check) for any other writer, or where /proc cannot tell."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    status = f"/proc/{os.getppid()}/status"

    def users() -> str | None:
        try:
            with open(status, encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        return line
        except OSError:
            pass
        return None  # gone: it may have dropped privileges, written, and died

    started_as = users()
    if started_as is None:
        return None

    def unchanged() -> bool:
        # (a root writer therefore refuses what a program killed outright left in the pipe:
        # at most a batch or two beyond what was already read)
        return users() == started_as

    return unchanged


NICE = 10  # the writer (and the RocksDB threads it starts) yields the CPU to the application
# glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to
# 32 MB): RocksDB's memtable blocks, compaction buffers and table-reader index blocks then come
# from the heaps of its threads' arenas, and the holes they leave kept the writer's RSS growing
# over a long run (~90 MB of free heap after 200 000 queries, which malloc_trim cannot give
# back). A fixed threshold keeps blocks of 128 KB and more in mappings of their own, returned
# to the system when freed: 260 -> 193 MB over those queries, ~2-4 % more writer CPU.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold in this process (the writer process only); False where it
    is not glibc, or the user set the threshold already (`MALLOC_MMAP_THRESHOLD_`, tunables)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or "mmap_threshold" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # (musl, macOS)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except Exception:
        return False


def _never() -> bool:
    return False


def main() -> int:
    """Run the writer loop until the application goes away; exit status 0 when the run was finalized."""
    from .lifecycle import unblock_signals

    # A SIGTERM sent to every process of the application's cgroup (`systemctl stop`, a
    # container runtime, `pkill python`) must not end us before the application's exit flush:
    # we end on our own once the application is gone (the watchdog, bounded by its deadline).
    # Ignored before the signals are unblocked, so that one pending since our start (the
    # application's writer thread, which started us, blocks them) is discarded too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    unblock_signals()
    pin_mmap_threshold()  # (never in the application: the thread writer leaves malloc alone)
    try:
        # Before Aim starts RocksDB's background threads: they inherit it. On a busy machine
        # the application keeps its CPU; the writer uses what is idle (and all of it while
        # the application waits for it at exit).
        os.nice(NICE)
    except (AttributeError, OSError):
        pass
    # Keep the protocol channel private: anything printed by Aim goes to stderr instead.
    ack_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from .writer import ACK_SYNC

    with contextlib.suppress(OSError):
        os.write(ack_fd, ACK_SYNC)  # what start-up printed on stdout came before: skipped

    from .aimrun import RunConfig, RunSink
    from .log import logger as log  # importing it installs the stderr fallback
    from .records import Flush
    from .wire import Records
    from .writer import Refused, read_frame

    stdin = os.fdopen(0, "rb", buffering=1 << 16)
    app_pid = os.getppid()
    trusted = _same_user_as_parent()
    config = read_frame(stdin, trusted)
    if not isinstance(config, RunConfig):
        return 2

    channel = _Channel(ack_fd)
    sink = RunSink(config)
    remote = sink.address is not None
    if remote:
        sink.on_ack = lambda token: channel.send(("ack", token))
        sink.exit_guard = False  # this process leaves through os._exit at its deadline
        _quiet_aim_transport()
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    shutdown = _Shutdown(float(config.flush_timeout), remote)
    inbox: queue.Queue[Any] = queue.Queue(maxsize=INBOX_BATCHES)
    counts = {"received": 0}

    def report() -> tuple[Any, ...]:
        confirmed = sink.confirmed
        return ("closed", confirmed, max(0, counts["received"] - confirmed), sink.failed)

    def reader() -> None:
        while True:
            try:
                msg = read_frame(stdin, trusted)
            except Exception as exc:
                # not a frame the application's aim-llama wrote (something else wrote into
                # the pipe): nothing after it can be trusted to be one either
                log.error("unreadable data in the pipe from the application (pid %d): %s: %s; "
                          "the run is finalized and later records are not stored", app_pid,
                          type(exc).__name__, str(exc)[:200])
                msg = None
            if isinstance(msg, Refused):
                if os.getppid() != app_pid:
                    # what is left in the pipe is only counted (from the chunk headers): read
                    # to its end, which is near (the application is gone)
                    left = msg.records
                    with contextlib.suppress(Exception):
                        while isinstance(more := read_frame(stdin, _never), Refused):
                            left += more.records
                    if left:  # (a close request alone: nothing lost)
                        log.warning("the application (pid %d) is gone: %d records it left in "
                                    "the pipe are not stored (a root writer unpickles only "
                                    "what the application sent while it still ran as its "
                                    "first user)", app_pid, left)
                else:
                    log.error("the application (pid %d) changed its user (it dropped root "
                              "privileges): this writer, still root, takes no more records "
                              "from it and finalizes the run; later records are not stored",
                              app_pid)
                msg = None
            if isinstance(msg, Records):
                n = sum(1 for r in msg if not isinstance(r, Flush))
                counts["received"] += n + msg.unreadable  # (those are the sink's to count lost)
                inbox.put((msg, n != len(msg)))
                continue
            budget = None
            if isinstance(msg, tuple) and msg[:1] == ("close",) and len(msg) > 1:
                budget = float(msg[1])
            shutdown.begin(budget)
            inbox.put(None)
            return

    def watchdog() -> None:
        parent = os.getppid()
        while not shutdown.started.wait(0.2):
            if parent > 1 and os.getppid() != parent:  # the application died
                shutdown.begin(None)
        while shutdown.left() + shutdown.slack > 0:
            time.sleep(min(0.1, max(0.01, shutdown.left() + shutdown.slack)))
        # Still here: storage is stuck (a server that went away, a hung connection).
        if remote:
            sink.give_up(counts["received"])
        else:
            missing = counts["received"] - sink.confirmed
            sink.lost = max(sink.lost, missing)
            log.error("the Aim writer for %s gave up after %.0fs: %d records not stored",
                      config.repo or "the local repo", local_grace(config.flush_timeout), missing)
        channel.send(report())
        _exit_now(3)

    threading.Thread(target=reader, name="aim-llama-reader", daemon=True).start()
    threading.Thread(target=watchdog, name="aim-llama-watchdog", daemon=True).start()

    announced = False
    reported = 0
    reported_lost = 0
    leaving = False
    last_store = 0.0  # the first batch is stored at once
    while not leaving:
        try:
            item = inbox.get(timeout=POLL_INTERVAL)
        except queue.Empty:
            tokens = sink.poll()
        else:
            if item is None:
                break
            batch, urgent = item
            while not urgent and len(batch) < MAX_COALESCED:
                wait = last_store + COALESCE - time.monotonic()
                if wait <= 0:
                    break
                try:
                    item = inbox.get(timeout=wait)
                except queue.Empty:
                    break
                if item is None:
                    leaving = True
                    break
                batch.merge(item[0])
                urgent = item[1]
            last_store = time.monotonic()
            try:
                tokens = sink.apply(batch)
            except Exception as exc:  # never die with records in flight: count, answer, go on
                tokens = _unstored(sink, batch, exc)
        if not announced and sink.run_hash:
            announced = True
            channel.send(("run", sink.run_hash))
        if sink.confirmed != reported:  # so that the application can count what a crash loses
            reported = sink.confirmed
            channel.send(("stored", reported))
        if sink.lost != reported_lost:  # before the acks: a flush answered after a loss says so
            reported_lost = sink.lost
            channel.send(("lost", reported_lost))
        for token in tokens:
            channel.send(("ack", token))
    try:
        if remote:
            sink.close(max(0.0, shutdown.left()))
        else:
            sink.close()
    except Exception as exc:
        log.error("could not finalize the Aim run: %s: %s", type(exc).__name__, exc)
    if not announced and sink.run_hash:
        channel.send(("run", sink.run_hash))
    channel.send(report())
    if remote or sink.failed is not None:
        # skip Aim's exit-time cleanup: it waits for a server that may be gone, or for a
        # finalizer that cannot write to a repo that refused our writes
        _exit_now(0)
    return 0


def _unstored(sink: Any, batch: list[Any], exc: BaseException) -> list[int]:
    """A batch the sink could not take: its records are counted as lost, its flush tokens
    answered (nothing before them will be stored), and the failure said once."""
    from .log import warn_once
    from .records import Flush

    tokens = [rec.token for rec in batch if isinstance(rec, Flush)]
    sink.lost += len(batch) - len(tokens)
    warn_once(f"writer-batch:{type(exc).__name__}",
              "could not store a batch of records in Aim (%s: %s); they are counted as lost",
              type(exc).__name__, exc)
    return tokens


def _quiet_aim_transport() -> None:
    """Aim's client logs a warning per reconnect attempt; ours says it once, with the address."""
    import logging

    logging.getLogger("aim.ext.transport").setLevel(logging.ERROR)


def _unraisable_hook(previous: Any) -> Any:
    """Silence a known Aim 3.29 bug instead of printing its traceback into the app's stderr.

    After a reconnect to a restarted server, Aim's resource finalizers raise `KeyError` in
    `Client.release_resource` when garbage-collected; the data is unaffected.
    """

    def hook(unraisable: Any) -> None:
        tb, files = unraisable.exc_traceback, []
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        in_transport = any(os.path.join("aim", "ext", "transport") in f for f in files)
        if isinstance(unraisable.exc_value, KeyError) and in_transport:
            return
        previous(unraisable)

    return hook


def _exit_now(status: int) -> None:
    """Leave at once (no atexit, no finalizers): flush our streams first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


if __name__ == "__main__":
    raise SystemExit(main())
