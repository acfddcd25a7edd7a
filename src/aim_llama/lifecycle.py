"""Process-exit plumbing: flush at normal exit, on SIGTERM/SIGINT, and the terminal-output tee.

Signal handling chains: our handler flushes (bounded by the flush timeout), then hands the
signal to whatever was installed before — the application's handler, or the default action
re-raised so a SIGTERMed process still dies with SIGTERM's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# Signals sent to the process from outside (not faults of one thread): the kernel hands each
# to any thread that does not block it, and Python runs the handler on the main thread only.
ASYNC_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                 "SIGCHLD", "SIGWINCH")
    if hasattr(signal, name)
)
# Blocked in aim-llama's threads: the signals above, and SIGPIPE, which a write to a writer
# process that died raises in the writing thread. Python ignores SIGPIPE, but an application
# may restore its default action (`prog | head`); blocked, the write fails with EPIPE instead
# of killing the application.
BACKGROUND_BLOCKED = ASYNC_SIGNALS | frozenset(
    [signal.SIGPIPE] if hasattr(signal, "SIGPIPE") else []
)


def start_background(thread: threading.Thread) -> None:
    """Start one of aim-llama's threads with the process's signals blocked in it.

    Otherwise the kernel may deliver the application's SIGTERM to our thread; CPython then
    runs the Python handler only when the main thread next wakes up — a main thread in
    `time.sleep(60)` heard it a minute late (measured: 1 in 50 SIGTERMs to a test app). The
    new thread inherits the mask, so there is no moment in which it could take a signal;
    threads it starts (Aim's, RocksDB's) inherit it in turn.
    """
    if not hasattr(signal, "pthread_sigmask"):
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, BACKGROUND_BLOCKED)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unblock_signals() -> None:
    """Undo `start_background`'s mask in a process started from such a thread (the mask is
    inherited across fork and exec), so it receives signals as any process does."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BACKGROUND_BLOCKED)


@contextlib.contextmanager
def sigpipe_as_error() -> Iterator[None]:
    """Writes to a pipe inside this block fail with EPIPE (`BrokenPipeError`) and never kill
    the process, whatever the application set SIGPIPE to: the signal is blocked in the calling
    thread for the block, and one it raised is taken off again before it is unblocked."""
    if not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "SIGPIPE"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        yield
    finally:
        if signal.SIGPIPE not in previous:
            with contextlib.suppress(OSError):
                while signal.SIGPIPE in signal.sigpending():
                    signal.sigtimedwait({signal.SIGPIPE}, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalChain:
    """Installs a flush-then-chain handler for SIGTERM (and SIGINT when it has no Python handler:
    set to SIG_DFL, the process would die without its atexit flush)."""

    def __init__(self, on_signal: Callable[[int], bool | None]) -> None:
        self._on_signal = on_signal
        self._previous: dict[int, SignalHandler] = {}
        self._deferred: list[tuple[int, FrameType | None]] = []

    def install(self) -> bool:
        """Install on the main thread only (Python's rule); returns whether anything was installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN or current is None:
                continue  # the app wants it ignored, or a non-Python handler owns it
            if signum == signal.SIGINT and current is not signal.SIG_DFL:
                # KeyboardInterrupt unwinds normally and the atexit flush covers it; an app's
                # own Ctrl-C handler runs at once (a flush first would hold it up to the flush
                # timeout), and if it exits, the atexit flush covers that too.
                continue
            if current == self._handle:
                continue  # installed already (a forked child that starts to record)
            self._previous[signum] = current
            signal.signal(signum, self._handle)
        return bool(self._previous)

    def uninstall(self) -> None:
        """Put back the previous handlers where ours is still the installed one."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous.clear()

    def chains_to_app(self, signum: int) -> bool:
        """Whether `signum` goes on to a handler the application installed before ours."""
        return callable(self._previous.get(signum))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        handled: Any = True
        with contextlib.suppress(Exception):
            handled = self._on_signal(signum)
        if handled is False:
            # The signal interrupted a flush already running on this thread (e.g. an exit
            # hook): let it finish; `redeliver()` then passes the signal on.
            self._deferred.append((signum, frame))
            return
        self._chain(signum, frame)

    def redeliver(self) -> None:
        """Pass on signals that arrived while a flush was running; call right after it ended."""
        while self._deferred:
            signum, frame = self._deferred.pop(0)
            self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        # Default action: restore it and re-deliver, so the exit status is the signal's.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class TerminalTee:
    """Copies what the application writes to stdout/stderr to a callback (Aim's `logs`)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self._sink = sink
        self._patched: list[tuple[Any, Any]] = []
        self._busy = threading.local()

    def install(self) -> None:
        """Patch `write` of the current sys.stdout and sys.stderr, as Aim itself does."""
        for stream in (sys.stdout, sys.stderr):
            if stream is None or any(s is stream for s, _ in self._patched):
                continue
            original = stream.write

            def write(data: Any, _original: Any = original) -> Any:
                result = _original(data)
                if not getattr(self._busy, "on", False):
                    self._busy.on = True
                    try:
                        if isinstance(data, str) and data:
                            self._sink(data)
                    except Exception:
                        pass
                    finally:
                        self._busy.on = False
                return result

            try:
                stream.write = write  # type: ignore[method-assign]
            except (AttributeError, TypeError):
                continue
            self._patched.append((stream, original))

    def uninstall(self) -> None:
        """Restore the original `write` methods."""
        for stream, original in self._patched:
            stream_: Any = stream
            try:
                if getattr(original, "__self__", None) is stream and getattr(
                    original, "__func__", None
                ) is getattr(type(stream), "write", None):
                    del stream_.write  # drop our instance attribute; the class method shows again
                else:
                    stream_.write = original
            except (AttributeError, TypeError):
                pass
        self._patched.clear()
