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


_real_signal = signal.signal
_real_getsignal = signal.getsignal
_owner: SignalChain | None = None  # the chain whose handler is installed, if any


def _signal(signalnum: int, handler: SignalHandler) -> SignalHandler:
    """`signal.signal` while aim-llama's handler is installed: see `SignalChain.replace`."""
    chain = _owner
    if (chain is not None and type(signalnum) in (int, signal.Signals)
            and signalnum in (signal.SIGTERM, signal.SIGINT)):
        return chain.replace(signalnum, handler)
    return _real_signal(signalnum, handler)


def _getsignal(signalnum: int) -> SignalHandler:
    """`signal.getsignal` while aim-llama's handler is installed: what the application set."""
    chain = _owner
    if chain is not None and type(signalnum) in (int, signal.Signals):
        chain.sync(signalnum)
        if signalnum in chain._previous:
            return chain._previous[signalnum]
    return _real_getsignal(signalnum)


def _as_python_says(handler: SignalHandler) -> SignalHandler:
    """0 and 1 as `signal.getsignal` gives them back: SIG_DFL and SIG_IGN."""
    if handler is not None and not callable(handler) and handler in (0, 1):
        return signal.Handlers(int(handler))
    return handler


class SignalChain:
    """Installs a flush-then-chain handler for SIGTERM (and SIGINT when it has no Python handler:
    set to SIG_DFL, the process would die without its atexit flush).

    While installed it stays in front of what the application sets later: `signal.signal`
    for those two signals records the application's handler as the one to chain to, and
    `signal.getsignal` answers with it. A server that puts back the handler it found (SIG_DFL)
    and raises the signal again — uvicorn's shutdown, in a worker that loaded the application
    while serving — otherwise died of it without a flush.

    Not `armed` (a multiprocessing worker that has recorded nothing), it goes in front of the
    application's own handlers only, never of SIG_DFL: nothing to flush, and a Python-level
    handler in a worker blocked on a lock can miss `Pool.terminate()`'s SIGTERM (CPython's race).
    """

    def __init__(self, on_signal: Callable[[int], bool | None]) -> None:
        self._on_signal = on_signal
        self._previous: dict[int, SignalHandler] = {}
        self._deferred: list[tuple[int, FrameType | None]] = []
        self.armed = True

    def _wanted(self, signum: int, handler: SignalHandler) -> bool:
        """Whether our handler goes in front of `handler`."""
        if handler is None or handler == signal.SIG_IGN:
            return False  # the app wants it ignored, or a non-Python handler owns it
        if handler == signal.SIG_DFL:
            return self.armed
        # SIGINT only at SIG_DFL: KeyboardInterrupt unwinds normally and the atexit flush
        # covers it; an app's own Ctrl-C handler runs at once (a flush first would hold it up
        # to the flush timeout), and if it exits, the atexit flush covers that too.
        return signum != signal.SIGINT

    def install(self, armed: bool = True) -> bool:
        """Install on the main thread only (Python's rule); returns whether anything was installed."""
        global _owner
        if threading.current_thread() is not threading.main_thread():
            return False
        self.armed = armed
        self._put_in_front()
        _owner = self
        if signal.signal is _real_signal:
            signal.signal = _signal
            signal.getsignal = _getsignal
        return bool(self._previous)

    def arm(self) -> None:
        """The process has recorded: go in front of SIG_DFL too (now, on the main thread; else
        at the application's next `signal.signal` there)."""
        if not self.armed:
            self.armed = True
            if threading.current_thread() is threading.main_thread() and _owner is self:
                self._put_in_front()

    def _put_in_front(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = _real_getsignal(signum)
            if current == self._handle or not self._wanted(signum, current):
                continue  # (installed already: a forked child that starts to record)
            self._previous[signum] = current
            _real_signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put back the previous handlers where ours is still the installed one. (Off the main
        thread only Python's `signal` functions are given back: our handler stays, chaining.)"""
        global _owner
        if _owner is self:
            _owner = None
            if signal.signal is _signal:
                signal.signal = _real_signal
                signal.getsignal = _real_getsignal
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if _real_getsignal(signum) == self._handle:
                _real_signal(signum, previous)
        self._previous.clear()

    def sync(self, signum: int) -> None:
        """Forget `signum` if ours is no longer installed for it (replaced through a
        `signal.signal` saved before activation): the application's handler is then the one."""
        if signum in self._previous and _real_getsignal(signum) != self._handle:
            del self._previous[signum]

    def replace(self, signum: int, handler: SignalHandler) -> SignalHandler:
        """The application sets `handler` for SIGTERM / SIGINT: ours stays in front and chains
        to it, or steps aside (SIG_IGN; an app's own Ctrl-C handler). Returns what the
        application had set, and raises what `signal.signal` raises."""
        if (threading.current_thread() is not threading.main_thread()
                or not (callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN))):
            return _real_signal(signum, handler)  # (its error)
        handler = _as_python_says(handler)
        self.sync(signum)
        before = (self._previous[signum] if signum in self._previous
                  else _real_getsignal(signum))
        if handler == self._handle:
            return before  # (ours, read before: nothing changes)
        if self._wanted(signum, handler):
            if _real_getsignal(signum) != self._handle:
                _real_signal(signum, self._handle)
            self._previous[signum] = handler
        else:
            _real_signal(signum, handler)
            self._previous.pop(signum, None)
        return before

    def chains_to_app(self, signum: int) -> bool:
        """Whether `signum` goes on to a handler the application installed."""
        return callable(self._previous.get(signum))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        handled: Any = True
        with contextlib.suppress(Exception):
            handled = self._on_signal(signum)
        if handled is False and signum != signal.SIGINT:
            # The signal interrupted a flush already running on this thread (e.g. an exit
            # hook): let it finish; `redeliver()` then passes the signal on. (A Ctrl-C goes on
            # at once: it stops the wait, as it does at exit without our handler.)
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
        self._previous.pop(signum, None)
        _real_signal(signum, signal.SIG_DFL)
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
