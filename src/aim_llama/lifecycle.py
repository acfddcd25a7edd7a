"""Process-exit plumbing: flush at normal exit, on SIGTERM/SIGINT, and the terminal-output tee.

Signal handling chains: our handler flushes (bounded by the flush timeout), then hands the
signal to whatever was installed before — the application's handler, or the default action
re-raised so a SIGTERMed process still dies with SIGTERM's status.
"""

from __future__ import annotations

import contextlib
import operator
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


def _number(signalnum: Any) -> int | None:
    """The signal number Python's `signal` functions would take `signalnum` for, if any."""
    try:
        return operator.index(signalnum)
    except Exception:
        return None  # (Python's own function says what is wrong with it)


def _signal(signalnum: int, handler: SignalHandler) -> SignalHandler:
    """`signal.signal` while aim-llama's handler is installed: see `SignalChain.replace`."""
    chain = _owner
    number = _number(signalnum)
    if chain is not None and number in (signal.SIGTERM, signal.SIGINT):
        return chain.replace(signal.Signals(number), handler)
    return _real_signal(signalnum, handler)


def _getsignal(signalnum: int) -> SignalHandler:
    """`signal.getsignal` while aim-llama's handler is installed: what the application set."""
    chain = _owner
    number = _number(signalnum)
    if chain is not None and number is not None:
        chain.sync(number)
        if number in chain._previous:
            return chain._previous[number]
    return _real_getsignal(signalnum)


_for_main_thread: list[Callable[[], None]] = []  # waiting for the main thread to run them
_for_main_lock = threading.Lock()
_scheduled = False  # a pending call is queued (one is enough: it runs everything waiting)
_pending_callback: Any = None  # the ctypes callback handed to the interpreter (kept alive)


def _run_for_main_thread(_arg: Any) -> int:
    global _scheduled
    with _for_main_lock:
        calls = list(_for_main_thread)
        _for_main_thread.clear()
        _scheduled = False
    for fn in calls:
        with contextlib.suppress(Exception):
            fn()
    return 0


def on_main_thread(fn: Callable[[], None]) -> bool:
    """Run `fn` on the main thread the next time it runs Python code (CPython's
    `Py_AddPendingCall`): only the main thread may install a signal handler, and a record may
    first come from another one. Returns whether it was run or scheduled."""
    global _scheduled, _pending_callback
    if threading.current_thread() is threading.main_thread():
        fn()
        return True
    with _for_main_lock:
        _for_main_thread.append(fn)
        if _scheduled:
            return True
        _scheduled = True
    try:
        import ctypes

        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
        if _pending_callback is None:
            _pending_callback = callback_type(_run_for_main_thread)
        add = ctypes.pythonapi.Py_AddPendingCall
        add.argtypes = [callback_type, ctypes.c_void_p]
        add.restype = ctypes.c_int
        if add(_pending_callback, None) == 0:
            return True
    except Exception:  # not CPython, or no ctypes
        pass
    with _for_main_lock:
        _scheduled = False
        with contextlib.suppress(ValueError):
            _for_main_thread.remove(fn)
    return False


def _reset_after_fork() -> None:
    """A forked child starts with nothing scheduled (its copy of the queue may never run)."""
    global _for_main_lock, _scheduled
    _for_main_lock = threading.Lock()
    _scheduled = False
    _for_main_thread.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _caught_outside_python(signum: int) -> bool:
    """Whether the process catches `signum` with a handler Python does not know of
    (`faulthandler.register`, a C extension's): Python reports SIG_DFL for it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _as_python_says(handler: SignalHandler) -> SignalHandler:
    """0 and 1 as `signal.getsignal` gives them back: SIG_DFL and SIG_IGN."""
    if handler is not None and not callable(handler) and handler in (0, 1):
        return signal.Handlers(int(handler))
    return handler


def _warn_foreign(signum: int) -> None:
    from .log import warn_once

    name = signal.Signals(signum).name
    warn_once(f"foreign-handler:{name}",
              "%s has a handler outside Python (faulthandler.register or a C extension): "
              "aim-llama leaves it alone, so records not yet stored when it arrives are not "
              "flushed first", name)


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
        """Install (on the main thread, Python's rule: called from another thread, when the
        main thread next runs Python code). Returns whether anything was installed now."""
        global _owner
        self.armed = armed
        _owner = self
        if signal.signal is _real_signal:
            signal.signal = _signal
            signal.getsignal = _getsignal
        if threading.current_thread() is not threading.main_thread():
            on_main_thread(self._put_in_front)
            return False
        self._put_in_front()
        return bool(self._previous)

    def arm(self) -> None:
        """The process has recorded: go in front of SIG_DFL too (on the main thread, now or
        when it next runs Python code: a worker's first record may come from another thread)."""
        if not self.armed:
            self.armed = True
            if _owner is self:
                on_main_thread(self._put_in_front)

    def _put_in_front(self) -> None:
        if _owner is not self:
            return  # (uninstalled before the main thread got to it)
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = _real_getsignal(signum)
            stale = getattr(current, "__self__", None)
            if isinstance(stale, SignalChain) and stale is not self:
                # an earlier activation's, not yet put back (uninstalled off the main
                # thread): take its place, in front of what it chained to
                current = stale._previous.get(signum, signal.SIG_DFL)
                if not self._wanted(signum, current):
                    _real_signal(signum, current)
                    continue
            if current == self._handle or not self._wanted(signum, current):
                continue  # (installed already: a forked child that starts to record)
            if _real_getsignal(signum) == signal.SIG_DFL and _caught_outside_python(signum):
                _warn_foreign(signum)
                continue  # not ours to replace: its owner would stop working
            self._previous[signum] = current
            _real_signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put back the previous handlers where ours is still the installed one (called from
        another thread: Python's `signal` functions now, the handlers when the main thread
        next runs Python code; until then ours stays, chaining)."""
        global _owner
        if _owner is self:
            _owner = None
            if signal.signal is _signal:
                signal.signal = _real_signal
                signal.getsignal = _real_getsignal
        on_main_thread(self._put_back)

    def _put_back(self) -> None:
        if _owner is self:
            return  # (installed again before the main thread got to it)
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
        interrupted: KeyboardInterrupt | None = None
        try:
            handled = self._on_signal(signum)
        except KeyboardInterrupt as exc:
            if signum == signal.SIGINT:
                raise
            # Ctrl-C stopped the wait of a SIGTERM's flush: the SIGTERM goes on as it would
            # have (the default action ends the process), then the Ctrl-C reaches the app
            interrupted = exc
        except Exception:
            pass
        if interrupted is not None:
            self._chain(signum, frame)  # (what the app's handler raises goes on instead)
            raise interrupted
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


# One for every tee of the process: a write that passes through an earlier activation's
# wrapper (left in place under the application's own) and this one's is copied once.
_tee_busy = threading.local()


class TerminalTee:
    """Copies what the application writes to stdout/stderr to a callback (Aim's `logs`)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self._sink = sink
        self._patched: list[tuple[Any, Any]] = []  # (stream, the write ours calls)
        self._ours: dict[int, Any] = {}  # id(stream) -> our write, as set on it
        self._on = True  # (a wrapper another's write kept after `uninstall()` passes through)

    def install(self) -> None:
        """Patch `write` of the current sys.stdout and sys.stderr, as Aim itself does."""
        self._on = True
        for stream in (sys.stdout, sys.stderr):
            if stream is None or any(s is stream for s, _ in self._patched):
                continue
            self._wrap(stream)

    def refresh(self) -> None:
        """Wrap again a stream whose `write` someone else put back since: IPython replaces
        `sys.stdout.write` for each cell and restores its own copy after it, and with it went
        ours (only the cell that activated aim-llama reached the Logs)."""
        for stream, _ in list(self._patched):
            if getattr(stream, "write", None) is not self._ours.get(id(stream)):
                self._patched = [(s, o) for s, o in self._patched if s is not stream]
                self._wrap(stream)

    def _wrap(self, stream: Any) -> None:
        original = stream.write
        busy = _tee_busy

        def write(data: Any, _original: Any = original) -> Any:
            if not self._on or getattr(busy, "on", False):  # (our sink writing, ours in ours)
                return _original(data)
            busy.on = True
            try:
                result = _original(data)
                try:
                    if isinstance(data, str) and data:
                        self._sink(data)
                except Exception:
                    pass
                return result
            finally:
                busy.on = False

        try:
            stream.write = write
        except (AttributeError, TypeError):
            return
        self._patched.append((stream, original))
        self._ours[id(stream)] = write

    def uninstall(self) -> None:
        """Restore the original `write` methods (where ours is still in place: one someone
        else put there since is theirs to keep)."""
        for stream, original in self._patched:
            stream_: Any = stream
            if getattr(stream, "write", None) is not self._ours.get(id(stream)):
                continue
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
        self._ours.clear()
        self._on = False
