"""Aim's exit-time machinery, made safe for an instrumented program.

Aim finalizes runs from atexit in a thread of its own, starts status-reporter threads per run
and registers atexit hooks as it opens one; on Python 3.12+ (no new threads at shutdown), with
a server that is gone, or with a repo deleted under it, each of these can print tracebacks or
hold the interpreter at exit forever. `RunSink` calls these patches and bounds; nothing here
runs on the application's thread before its exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import remote

log = logging.getLogger("aim_llama")


def at_shutdown(exc: BaseException) -> bool:
    """Whether `exc` is Python refusing a new thread because the interpreter is shutting down."""
    return isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc)


class _InertReporter:
    """Stands in for an Aim status reporter that could not start its thread: every method of
    it (`check_in`, `close`, `stop` …) does nothing, so no caller in Aim needs a None check."""

    def __getattr__(self, name: str) -> Any:
        return _do_nothing


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def patch_aim_status_reporters() -> None:
    """Let Aim open a local Run while the interpreter shuts down (Python 3.12+).

    A Run starts two status-reporter threads (they keep "still running" check-in files fresh);
    from Python 3.12 no thread may start at shutdown, which is when the thread writer of a
    short-lived program opens its run. There the reporter is left out — the run is finalized
    moments later, so an inert stand-in (`_InertReporter`) takes the reporter's place.
    At any other time (and on Python < 3.12, where threads may still start then) the real
    reporter is made, unchanged.
    """
    try:
        import aim.sdk.run as aim_run
    except Exception:
        return
    for name in ("RunStatusReporter", "ScheduledStatusReporter"):
        real = getattr(aim_run, name, None)
        if real is None or getattr(real, "_aim_llama", False):
            continue

        def make(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            try:
                return _real(*args, **kwargs)
            except RuntimeError as exc:
                if not at_shutdown(exc):
                    raise
                return _InertReporter()

        setattr(make, "_aim_llama", True)  # noqa: B010 (mypy: no such attribute)
        setattr(aim_run, name, make)


def patch_aim_exit_cleanup() -> None:
    """Make Aim's exit-time cleanup work on Python 3.12+.

    Aim's `AutoClean.cleanup` (registered with atexit) runs its finalizers in a new thread;
    from Python 3.12 no thread may start at interpreter shutdown, so it fails with a traceback
    and leaves runs unfinalized. Our replacement falls back to running them in place.
    """
    try:
        from aim.ext.cleanup import AutoClean
    except Exception:
        return
    original = AutoClean.__dict__.get("cleanup")
    original_func = getattr(original, "__func__", original)
    if original_func is None or getattr(original_func, "_aim_llama", False):
        return

    def cleanup() -> None:
        try:
            original_func()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            _cleanup_in_place(AutoClean)

    def run_finalizers() -> None:
        # Aim's own `_cleanup` (in its thread), except that one finalizer that raises (a
        # request to a server that is gone, a repo whose directory was deleted) neither skips
        # the others nor leaves `stop_signal` unset: the interpreter would wait forever at exit.
        failures: list[Exception] = []
        try:
            _run_finalizers(AutoClean, failures.append)
        finally:
            AutoClean.stop_signal.set()
        if failures:
            raise failures[0]  # (for the thread's excepthook: see `quiet_aim_cleanup`)

    cleanup._aim_llama = True  # type: ignore[attr-defined]
    AutoClean.cleanup = staticmethod(cleanup)  # type: ignore[method-assign]
    if hasattr(getattr(AutoClean, "_finalizers", None), "items"):  # (Aim 3.29's layout)
        AutoClean._cleanup = staticmethod(run_finalizers)  # type: ignore[method-assign]
    if getattr(AutoClean, "_registered_with_atexit", False):
        atexit.unregister(original_func)
        atexit.register(cleanup)


# Set once a sink gave up on its server: Aim's exit finalizers then must not run in place
# (they send requests without a timeout to that server, which may never answer).
server_abandoned: list[bool] = []
servers_in_use: list[remote.Address] = []  # the aim:// servers this process opened runs on


def _cleanup_in_place(auto_clean: Any) -> None:
    """Aim's exit finalizers, run in this thread (its own runs them in a new one): every one is
    tried; failures are kept out of stderr as `quiet_aim_cleanup` keeps those of Aim's thread.
    None of them once we gave up on the server: what it never confirmed is reported already."""
    for address in servers_in_use:
        if server_abandoned:
            break
        try:  # (no thread may start now to bound a request: ask, with a timeout, first)
            remote.server_version(address, timeout=0.5)
        except Exception:
            server_abandoned.append(True)
    if server_abandoned:
        auto_clean.stop_signal.set()
        return
    if not hasattr(getattr(auto_clean, "_finalizers", None), "items"):
        auto_clean._cleanup()
        return

    def failed(exc: Exception) -> None:
        if _cleanup_quiet and (_cleanup_quiet[0] or isinstance(exc, OSError)):
            return  # about the server being gone: what that lost is reported already
        log.warning("Aim's exit cleanup failed: %s: %s", type(exc).__name__, exc)

    _run_finalizers(auto_clean, failed)
    auto_clean.stop_signal.set()


def _run_finalizers(auto_clean: Any, failed: Callable[[Exception], None]) -> None:
    """Aim's exit finalizers (`AutoClean._finalizers`, a WeakKeyDictionary in 3.29), highest
    priority first as Aim orders them, each tried whatever the others did."""
    finalizers: Any = auto_clean._finalizers
    for _attempt in range(10):
        try:
            entries = list(finalizers.items())
            break
        except RuntimeError:  # "changed size during iteration": a Run opening in another thread
            time.sleep(0.01)
    else:
        entries = []
    for _key, (_priority, finalizer) in reversed(sorted(entries, key=lambda item: item[1][0])):
        try:
            finalizer()
        except Exception as exc:
            failed(exc)


@contextlib.contextmanager
def tolerant_atexit() -> Iterator[None]:
    """Let Aim create a Run while the interpreter is already running atexit callbacks.

    Aim registers an atexit hook per Run, and importing it pulls in concurrent.futures, which
    registers one too; during shutdown both raise. We finalize the run ourselves in `close()`,
    so a registration refused at shutdown can be skipped safely (thread writer only: the
    writer process never opens its run at shutdown).
    """
    original = atexit.register
    original_threading = getattr(threading, "_register_atexit", None)

    def register(func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(func, *args, **kwargs)
        except RuntimeError:
            return func

    def register_threading(func: Any, *args: Any, **kwargs: Any) -> None:
        try:
            if original_threading is not None:
                original_threading(func, *args, **kwargs)
        except RuntimeError:
            pass  # e.g. concurrent.futures imported during shutdown

    atexit.register = register  # type: ignore[assignment]
    if original_threading is not None:
        threading._register_atexit = register_threading  # type: ignore[attr-defined]
    try:
        yield
    finally:
        atexit.register = original
        if original_threading is not None:
            threading._register_atexit = original_threading  # type: ignore[attr-defined]


_cleanup_quiet: list[bool] = []  # [everything?] once the hook below is installed


def quiet_aim_cleanup(everything: bool = False) -> None:
    """Keep tracebacks of Aim's exit-cleanup thread out of the application's stderr when they
    are about the server being unreachable (we report what that lost, in one line); with
    `everything`, after we gave up on the server, all of them. Installed once."""
    try:
        from aim.ext.cleanup import RobustExec
    except Exception:
        return
    if _cleanup_quiet:
        _cleanup_quiet[0] = _cleanup_quiet[0] or everything
        return
    _cleanup_quiet.append(everything)
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if isinstance(args.thread, RobustExec) and (
                _cleanup_quiet[0] or isinstance(args.exc_value, OSError)):
            return  # requests' ConnectionError is an OSError
        if isinstance(args.exc_value, OSError) and _in_aim_reporter(args.exc_traceback):
            return  # its run's repo was deleted: the sink says so, in one line
        previous(args)

    threading.excepthook = hook


def _in_aim_reporter(tb: Any) -> bool:
    """Whether a traceback passes through Aim's run status reporter (a thread of its own that
    touches a file in the repo every few seconds)."""
    marker = os.path.join("aim", "sdk", "reporter")
    while tb is not None:
        if marker in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def aim_cleanup_done(budget: float) -> bool:
    """Whether Aim's exit cleanup finished within `budget` seconds (with its finalizers run
    by `patch_aim_exit_cleanup`, also when one raised; not when one never returns: a hung
    server, whose requests have no timeout)."""
    try:
        from aim.ext.cleanup import AutoClean
    except Exception:
        return True
    return AutoClean.stop_signal.wait(budget)


def release_aim_exit(budget: float = 1.0) -> None:
    """Unblock Aim's exit cleanup after we gave up on a vanished server.

    Aim's `AutoClean.cleanup` runs its finalizers in a thread and waits for a signal that thread
    sets only when all succeeded; a finalizer that raises (a request to the dead server) or
    never returns (a server that stopped answering: Aim's requests have no timeout) leaves the
    interpreter waiting forever. Once that thread is gone — or at the end of `budget` seconds,
    whatever it is doing — set the signal ourselves, and keep the failed requests' tracebacks
    out of the application's stderr. (The thread was started during exit, after Python joined
    its threads, so nothing waits for it afterwards.)
    """
    try:
        from aim.ext.cleanup import AutoClean, RobustExec
    except Exception:
        return
    quiet_aim_cleanup(everything=True)
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline and not AutoClean.stop_signal.is_set():
        if not any(isinstance(t, RobustExec) and t.is_alive() for t in threading.enumerate()):
            time.sleep(0.2)  # it may be about to start, or just finished
            if not any(isinstance(t, RobustExec) and t.is_alive() for t in threading.enumerate()):
                break
        time.sleep(0.1)
    AutoClean.stop_signal.set()
