"""Turn aim-llama on and off: `instrument()`, `uninstrument()`, `is_instrumented()`, `flush()`.

Idempotent and thread-safe: however many times activation runs (imports of `aim_llama.auto`,
calls to `instrument()`, the start-up hook), one handler sits on LlamaIndex's global callback
manager and one writer owns the process's Aim run. Failures are logged once and the
application carries on uninstrumented, unless strict mode asks for an exception.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .log import warn_once

log = logging.getLogger("aim_llama")

_lock = threading.RLock()


@dataclass
class _Active:
    handler: Any
    writer: Any
    settings: Any
    callback_managers: _CallbackManagers
    signals: Any
    tee: Any
    pid: int


_active: _Active | None = None
_closing: _Active | None = None  # being uninstrumented: its writer is flushing
_atexit_registered = False
_fork_hook_registered = False


def _switch(name: str, overrides: dict[str, Any]) -> bool | None:
    """`enabled` / `strict` from the highest source that sets it, read on its own (switches.py):
    known even when another setting is invalid; never raises."""
    try:
        from .switches import switch

        return switch(name, overrides=overrides)
    except Exception:
        return None


def _report_config_error(exc: ConfigError, active: bool = False) -> None:
    if active:  # instrument(bad=…) after activation: the earlier settings go on recording
        warn_once(f"config:{exc}", "%s — instrument() ignored; recording continues with the "
                  "earlier settings", str(exc))
    else:
        warn_once(f"config:{exc}", "%s — running without Aim instrumentation", str(exc))


def is_instrumented() -> bool:
    """True when aim-llama's handler is registered in this process."""
    return _active is not None and _active.pid == os.getpid()


def active_handler() -> Any:
    """This process's aim-llama callback handler, or None (where an unpickled one lands)."""
    active = _active
    return active.handler if active is not None and active.pid == os.getpid() else None


def instrument(**overrides: Any) -> bool:
    """Register aim-llama on LlamaIndex using settings (kwargs > env > TOML files > defaults).

    Returns True when instrumentation is active after the call. Never raises unless strict
    mode is on, in which case a bad configuration raises `ConfigError` and any other failure
    propagates.
    """
    global _active
    with _lock:
        if is_instrumented():
            if not overrides:
                return True
            if not _reconfigure(overrides):
                return True
        if _switch("enabled", overrides) is False:
            return False  # the kill switch wins even over a broken configuration
        try:
            from .settings import check_resolvable, load_settings

            loaded = load_settings(overrides)
            check_resolvable(loaded)
        except ConfigError as exc:
            if _switch("strict", overrides):
                raise
            _report_config_error(exc)
            return False
        except Exception as exc:  # anything else reading the configuration: still fail open
            if _switch("strict", overrides):
                raise
            warn_once(
                f"config:{type(exc).__name__}",
                "could not read aim-llama's configuration (%s: %s) — running without Aim "
                "instrumentation",
                type(exc).__name__,
                exc,
            )
            return False
        for note in loaded.warnings:
            warn_once(f"config-note:{note}", "%s", note)
        settings = loaded.settings
        if not settings.enabled:
            return False
        try:
            _active = _activate(settings)
        except Exception as exc:
            if settings.strict:
                raise
            warn_once(
                f"activate:{type(exc).__name__}",
                "could not instrument LlamaIndex (%s: %s) — running without Aim instrumentation",
                type(exc).__name__,
                exc,
            )
            return False
        return True


def _reconfigure(overrides: dict[str, Any]) -> bool:
    """`instrument(**settings)` while already active (the launcher or `import aim_llama.auto`
    activated first). True when the caller should activate again with these settings: they
    differ and nothing was recorded yet, so the active instrumentation was removed. False
    when they change nothing, or are invalid, or come too late (reported once; raised in
    strict mode): settings never change under a run that already holds records (lock held)."""
    from .settings import load_settings

    active = _active
    assert active is not None
    strict = _switch("strict", overrides) or bool(getattr(active.settings, "strict", False))
    try:
        wanted = load_settings(overrides).settings
    except ConfigError as exc:
        if strict:
            raise
        _report_config_error(exc, active=True)
        return False
    wanted = wanted.model_copy(update={"repo": _fixed_repo(wanted.repo)})
    changed = sorted(name for name in type(wanted).model_fields
                     if getattr(wanted, name) != getattr(active.settings, name, None))
    if not changed:
        return False
    if not getattr(active.writer, "_started", True):
        log.debug("aim-llama: activating again with instrument()'s settings (%s)", changed)
        uninstrument()
        return True
    message = (
        f"instrument({', '.join(f'{k}=...' for k in sorted(overrides))}) came after aim-llama "
        f"had started recording (activated earlier in this process: by the launcher, "
        f"`import aim_llama.auto` or an earlier instrument()): "
        f"{', '.join(changed)} "
        f"{'stays as it was' if len(changed) == 1 else 'stay as they were'} for this process; call "
        f"aim_llama.uninstrument() first to start a new run with other settings"
    )
    if strict:
        raise ConfigError(message, setting=changed[0], source="instrument()")
    warn_once("instrument-late", "%s", message)
    return False


def _environment() -> dict[str, str]:
    """This process's environment as `__system_params` shows it (secret-looking names dropped)."""
    from .sysparams import environment_variables

    return environment_variables()


def _multiprocessing_child() -> str | None:
    """The role of a multiprocessing worker that activates aim-llama itself (None elsewhere):
    `spawn-child` for spawn and forkserver workers, `fork-child` for a fork worker whose parent
    had not activated it (a lazy LlamaIndex import inside the task, say)."""
    process = sys.modules.get("multiprocessing.process")
    if process is None or "multiprocessing.util" not in sys.modules:
        return None
    try:
        if process.parent_process() is None:
            return None
    except Exception:
        return None
    argv = " ".join(getattr(sys, "orig_argv", ()))
    return "spawn-child" if ("--multiprocessing-fork" in argv
                             or "multiprocessing.forkserver" in argv) else "fork-child"


def _fixed_repo(repo: str | None) -> str | None:
    """A local repo as an absolute path, fixed where activation happened (an aim:// address
    as it is; as given when the working directory no longer exists)."""
    from .aimrun import resolve_repo

    try:
        return resolve_repo(repo)
    except OSError:
        return repo


def _run_config(settings: Any, role: str) -> Any:
    from . import __version__
    from .aimrun import RunConfig
    from .content import patterns_from

    return RunConfig(
        repo=settings.repo,  # made absolute at activation (`_activate`)
        experiment=settings.experiment,
        system_tracking_interval=settings.system_tracking_interval,
        log_system_params=settings.log_system_params,
        run_params=dict(settings.run_params),
        app_pid=os.getpid(),
        argv=tuple(sys.argv),
        executable=sys.executable,
        environment=_environment() if settings.log_system_params else None,
        writer=settings.writer,
        role=role,
        version=__version__,
        flush_timeout=settings.flush_timeout,
        buffer_size=settings.queue_size,
        max_text_length=settings.max_text_length,
        redact_patterns=patterns_from(settings),
    )


def _new_writer(settings: Any, role: str) -> Any:
    from .writer import Writer

    return Writer(
        _run_config(settings, role),
        queue_size=settings.queue_size,
        flush_timeout=settings.flush_timeout,
        backend=settings.writer,
    )


def _activate(settings: Any) -> _Active:
    global _atexit_registered, _fork_hook_registered
    from llama_index.core import Settings as LlamaSettings

    from . import dispatcher
    from .content import ContentPolicy
    from .handler import AimLlamaHandler
    from .lifecycle import SignalChain, TerminalTee
    from .records import TerminalOutput

    # A local repo is fixed where activation happened: an app (or a daemonized fork child)
    # that changes its working directory later still writes where it was configured to.
    fixed = _fixed_repo(settings.repo)
    if fixed != settings.repo:
        settings = settings.model_copy(update={"repo": fixed})
    worker = _multiprocessing_child()
    # A spawn or forkserver worker activating while its main module is prepared has no parent
    # process yet: its command line says what it is (never the environment, which its own
    # children inherit). A forkserver worker is forked from the server and inherits its command
    # line; it leaves through os._exit, as fork workers do.
    argv = " ".join(getattr(sys, "orig_argv", ()))
    spawned = "--multiprocessing-fork" in argv or "multiprocessing.forkserver" in argv
    role = os.environ.get("AIM_LLAMA_ROLE") or worker or ("spawn-child" if spawned else "main")
    writer = _new_writer(settings, role)
    if worker is not None or spawned:
        _close_with_multiprocessing(writer)
    handler = AimLlamaHandler(
        writer.submit,
        event_starts_to_ignore=settings.event_starts_to_ignore,
        event_ends_to_ignore=settings.event_ends_to_ignore,
        policy=ContentPolicy.from_settings(settings),
        submit_many=writer.submit_many,
    )
    managers = _CallbackManagers(LlamaSettings, handler)
    # Spans, LLM calls, tools … come from the global dispatcher (one span + one event handler).
    handler.observer = dispatcher.install(handler, settings)
    handler.observer.on_new_request = managers.follow

    tee = None
    if settings.capture_terminal_logs:

        def to_logs(text: str) -> None:
            active = _active
            if active is not None and active.writer._started:
                active.writer.submit(TerminalOutput(text))

        tee = TerminalTee(to_logs)
        tee.install()
        follow = managers.follow

        def on_new_request(_tee: TerminalTee = tee) -> None:
            follow()
            _tee.refresh()  # (a notebook puts its own `write` back after each cell)

        handler.observer.on_new_request = on_new_request

    signals = SignalChain(_on_signal)
    if worker is not None or spawned:
        # A multiprocessing worker: nothing to flush before its first record, and a Python-level
        # SIGTERM handler can hang `Pool.terminate()` (see `SignalChain`): armed at that record.
        signals.install(armed=False)
        _arm_at_first_record(handler, writer, signals)
    else:
        signals.install()
    if not _atexit_registered:
        _finalizers_exit_first()
        atexit.register(_at_exit)
        _atexit_registered = True
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    _hook_exec()
    return _Active(handler, writer, settings, managers, signals, tee, os.getpid())


class _CallbackManagers:
    """The CallbackManagers aim-llama's callback handler is on: `Settings.callback_manager` at
    activation, and any the application puts there later — `Settings.callback_manager =
    CallbackManager([LlamaDebugHandler()])` is LlamaIndex's documented idiom, and activation
    (launcher, `import aim_llama.auto`) always comes first. Checked at each new request. Held
    weakly: an app that makes a manager per request must not have them all kept alive."""

    def __init__(self, llama_settings: Any, handler: Any) -> None:
        self._settings = llama_settings
        self._handler = handler
        self._managers: list[Callable[[], Any]] = []
        current = llama_settings.callback_manager  # (LlamaIndex creates one if there is none)
        self._current: Callable[[], Any] | None = None
        self._attach(current)

    @property
    def managers(self) -> list[Any]:
        """The managers the handler was put on that are still alive."""
        return [m for m in (ref() for ref in self._managers) if m is not None]

    def _attach(self, manager: Any) -> None:
        self._strip(manager)
        manager.add_handler(self._handler)
        self._remember(manager)

    def _strip(self, manager: Any) -> None:
        """Take other aim-llama handlers off `manager` (an earlier activation's, an unpickled
        inert one): they pass events on to this one, which would record them twice."""
        from .handler import AIM_LLAMA_HANDLERS

        for existing in list(manager.handlers):
            if existing is not self._handler and isinstance(existing, AIM_LLAMA_HANDLERS):
                manager.remove_handler(existing)

    def _remember(self, manager: Any) -> None:
        self._managers = [ref for ref in self._managers if ref() is not None]
        try:
            ref: Callable[[], Any] = weakref.ref(manager)
        except TypeError:  # (a stand-in that takes no weak reference: held, then)
            ref = functools.partial(lambda m: m, manager)
        if not any(known() is manager for known in self._managers):
            self._managers.append(ref)
        self._current = ref

    def follow(self) -> None:
        """Put the handler on the application's current `Settings.callback_manager` if it is
        a new one (an attribute read, a call and a comparison when it is not)."""
        current = getattr(self._settings, "_callback_manager", None)
        if current is None or (self._current is not None and current is self._current()):
            return
        if any(h is self._handler for h in current.handlers):  # (put back, or rebuilt with
            self._strip(current)  # the old one's handlers: ours among them)
            self._remember(current)
        else:
            self._attach(current)

    def detach(self) -> None:
        """Take the handler off every manager it was put on."""
        for manager in self.managers:
            with contextlib.suppress(Exception):
                manager.remove_handler(self._handler)
        self._managers = []
        self._current = None


def _arm_at_first_record(handler: Any, writer: Any, signals: Any) -> None:
    """Hand records to `writer`, arming `signals` at the first one."""
    submit, submit_many = writer.submit, writer.submit_many

    def arm() -> None:
        handler.submit, handler.submit_many = submit, submit_many
        with contextlib.suppress(Exception):
            signals.arm()

    def first(record: Any) -> None:
        arm()
        submit(record)

    def first_many(records: list[Any]) -> None:
        arm()
        submit_many(records)

    handler.submit, handler.submit_many = first, first_many


def flush(timeout: float | None = None) -> bool:
    """Block until everything recorded so far is stored in the Aim repo (or `timeout` passes).

    True when it is; False on timeout, or when records were dropped or lost since the previous
    `flush()` (a full queue, a server's buffer bound, a writer that died): the next one is True
    again once nothing more was lost.
    """
    active = _active
    if active is None or active.pid != os.getpid():
        return True
    return bool(active.writer.flush(timeout))


def current_run_hash(timeout: float | None = None) -> str | None:
    """The hash of this process's Aim run, once the first record created it (flushes first)."""
    active = _active
    if active is None:
        return None
    active.writer.flush(timeout)
    return active.writer.run_hash  # type: ignore[no-any-return]


def uninstrument() -> None:
    """Flush, finalize the run, and remove every handler and hook aim-llama added."""
    global _active, _closing
    with _lock:
        active, _active = _active, None
        if active is None:
            return
        _closing = active  # a SIGTERM meanwhile still waits for this flush (`_on_signal`)
        try:
            with contextlib.suppress(Exception):
                active.callback_managers.detach()
            active.handler.retired = True  # (on managers it is still on: it passes events on)
            with contextlib.suppress(Exception):
                from . import dispatcher

                dispatcher.uninstall()  # writes the traces of open requests, then unregisters
            if active.tee is not None:
                active.tee.uninstall()
            if active.pid == os.getpid():
                active.writer.close()
        finally:
            _closing = None
            try:
                active.signals.redeliver()  # a SIGTERM that came meanwhile goes on now
            finally:
                active.signals.uninstall()  # only now: until the run was finalized, SIGTERM
                # flushed (and a deferred one still knows the application's own handler)


def _finish_process(active: _Active) -> None:
    """Exit path (atexit or signal): traces of open requests, terminal tee off, flush, finalize."""
    observer = getattr(active.handler, "observer", None)
    if observer is not None:
        with contextlib.suppress(Exception):
            observer.close()  # requests still open get their trace, marked incomplete
    if active.tee is not None:
        active.tee.uninstall()
    active.writer.close()
    active.signals.redeliver()  # a SIGTERM that arrived during the flush takes effect now


def _hook_exec() -> None:
    """`os.execv` / `os.execve` (which every `os.exec*` ends in) store what was recorded first:
    exec replaces the process without running atexit, and what was still queued for the
    writer would be lost without a word. The process writer is flushed: the exec closes its
    pipe and it finalizes the run, and an exec that fails leaves the run recording. The thread
    writer's run lives in this process, so it is finalized."""
    for name in ("execv", "execve"):
        original = getattr(os, name, None)
        if original is None or hasattr(original, "__aim_llama_original__"):
            continue

        def hooked(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            active = _active
            if active is not None and active.pid == os.getpid():
                with contextlib.suppress(Exception):
                    if getattr(active.writer, "backend_name", "process") == "process":
                        _flush_before_exec(active.writer)
                    else:
                        _finish_process(active)
            return __original(*args, **kwargs)

        functools.update_wrapper(hooked, original)
        hooked.__aim_llama_original__ = original  # type: ignore[attr-defined]
        setattr(os, name, hooked)


def _flush_before_exec(writer: Any) -> None:
    """Store what is queued before an exec; say what could not be stored in time."""
    if writer.flush():
        return
    left = int(writer.queued) + int(getattr(writer, "_inflight", 0) or 0)
    if left:  # (what the writer process has received, it stores: not lost)
        log.warning(
            "exec: the Aim writer did not store everything within the flush timeout (%gs, "
            "AIM_LLAMA_FLUSH_TIMEOUT): up to %d records still in this process are lost if the "
            "exec succeeds (what the writer process received, it stores before it finalizes "
            "the run)", float(getattr(writer, "flush_timeout", 10.0)), left,
        )


def _finalizers_exit_first() -> None:
    """Have `weakref.finalize`'s exit hook registered before ours, so that it runs after ours
    (atexit: last registered, first run). Registered later — when the thread writer's Aim
    makes the process's first finalizer — it ran first: Aim's objects were finalized under the
    run still being stored (no end time), a database migration's directory deleted."""
    import weakref

    if not getattr(weakref.finalize, "_registered_with_atexit", True):
        weakref.finalize(_at_exit, _nothing).atexit = False  # (a function: lives as long)


def _nothing() -> None:
    pass


def _at_exit() -> None:
    active = _active
    if active is not None and active.pid == os.getpid():
        try:
            _finish_process(active)
        except KeyboardInterrupt:  # Ctrl-C while exit waits for the writer: stop waiting
            queued = getattr(active.writer, "queued", 0)
            log.warning(
                "exit interrupted (Ctrl-C) while storing the run: %d records still queued here "
                "were not stored; what the writer already received is stored and the run "
                "finalized by the writer process", queued,
            )


def _on_signal(signum: int) -> bool:
    """SIGTERM/SIGINT: store everything recorded so far, then let the signal go on.

    When the signal goes on to the application's own handler, that handler decides whether
    the process ends (a graceful shutdown may finish its requests first): everything so far is
    flushed, recording goes on, and the exit hook finalizes the run (or, if the handler leaves
    through `os._exit`, the writer process does). When it goes on to the default action, the
    run is finalized first. False when a flush is already running on this thread (the signal
    interrupted an exit hook or `uninstrument()`): the signal waits for it to finish.
    """
    active = _active or _closing
    if active is None or active.pid != os.getpid():
        return True
    writer = active.writer
    if getattr(writer, "closing_in", None) == threading.get_ident():
        return False
    if active is _active and active.signals.chains_to_app(signum):
        # what is recorded so far, stored before the application's handler runs (it may leave
        # through os._exit); briefly: the exit flush, if it exits, waits again, in full
        writer.flush(min(IN_FRONT_FLUSH, getattr(active.settings, "flush_timeout", IN_FRONT_FLUSH)))
        return True
    if active is _closing:
        writer.close()  # closing on another thread: wait for it (bounded), then go on
        return True
    _finish_process(active)
    return True


IN_FRONT_FLUSH = 2.0  # seconds a SIGTERM waits for the writer before the app's handler runs


def _after_fork_in_child() -> None:
    """A forked child must not touch the parent's run: it gets a writer (and run) of its own.

    The parent's writer is left alone (its pipe ends closed in the child, its Aim objects never
    finalized here). The child's writer starts at the child's first record, so a child that
    records nothing leaves no run, and it is finalized at exit, including by multiprocessing's
    `os._exit` path (a `multiprocessing.util.Finalize`) and by SIGTERM (`Pool.terminate()`).
    """
    global _lock
    _lock = threading.RLock()  # the parent may have held it while forking
    active = _active
    if active is None:
        return
    from . import log as log_module

    log_module._reported_lock = threading.Lock()  # may have been held by a vanished thread
    log_module.reset_reported()
    _disown_inherited_writer(active.writer)
    handler = active.handler
    with contextlib.suppress(Exception):
        handler._lock = threading.Lock()
        handler._open = {}  # the parent's open events end in the parent, not in this run
        handler.handler_errors = 0
    with contextlib.suppress(Exception):
        # Until the child records, it has nothing to flush: SIGTERM gets back what the app had
        # (a Python-level handler in a worker blocked on a lock can miss the SIGTERM of
        # `Pool.terminate()` — CPython's race — and hang the pool; measured 3 in 10 runs).
        active.signals.uninstall()
    pending = _ForkChildWriter(active.settings)
    active.writer = pending
    handler.submit = pending.submit
    handler.submit_many = pending.submit_many
    active.pid = os.getpid()


_inherited_writers: list[Any] = []  # parents' writers, kept alive (never closed) in a forked child


def _disown_inherited_writer(writer: Any) -> None:
    """Close this child's copies of the parent writer's pipes; detach Aim's exit hooks for its run."""
    _inherited_writers.append(writer)
    backend = getattr(writer, "_backend", None)
    proc = getattr(backend, "proc", None)
    for stream in (getattr(proc, "stdin", None), getattr(proc, "stdout", None)):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()  # raw pipes (bufsize=0): no lock that a vanished thread may hold
    cleanup = sys.modules.get("aim.ext.cleanup")
    if cleanup is not None:  # the thread writer opened a Run in the parent: never close it here
        with contextlib.suppress(Exception):
            for _priority, finalizer in list(cleanup.AutoClean._finalizers.values()):
                finalizer.detach()
            cleanup.AutoClean._finalizers.clear()
        repo_module = sys.modules.get("aim.sdk.repo")
        with contextlib.suppress(Exception):
            repo_module.Repo._pool.clear()  # type: ignore[union-attr]


class _ForkChildWriter:
    """Stands in for a forked child's writer until the child records something."""

    _started = False
    run_hash: str | None = None

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def submit(self, record: Any) -> None:
        """Start the child's own writer (and exit hooks), then hand it the record."""
        writer = _start_fork_child_writer(self)
        writer.submit(record)

    def submit_many(self, records: list[Any]) -> None:
        """`submit` for several records."""
        writer = _start_fork_child_writer(self)
        writer.submit_many(records)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True


def _start_fork_child_writer(pending: _ForkChildWriter) -> Any:
    with _lock:
        active = _active
        if active is None or active.writer is not pending:
            return active.writer if active is not None else pending
        settings = pending.settings
        if getattr(settings, "writer", "process") != "process":
            # An in-process Aim Run does not survive fork; a fresh writer process always does.
            with contextlib.suppress(Exception):
                settings = settings.model_copy(update={"writer": "process"})
        writer = _new_writer(settings, "fork-child")
        active.writer = writer
        with contextlib.suppress(Exception):
            active.signals.install()  # now there is something to flush on SIGTERM (main thread)
        active.handler.submit = writer.submit
        active.handler.submit_many = writer.submit_many
        _finalize_at_worker_exit(writer)
        return writer


def _finalize_at_worker_exit(writer: Any) -> None:
    """multiprocessing ends its workers through os._exit: atexit never runs, its exit hook
    (`multiprocessing.util.Finalize`) does."""
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        with contextlib.suppress(Exception):
            mp_util.Finalize(None, _close_fork_child_writer, args=(writer,), exitpriority=100)


def _close_with_multiprocessing(writer: Any) -> None:
    """`_finalize_at_worker_exit`, for a worker that activated while its main module was
    prepared (spawn, forkserver): it is bootstrapped after that, and the bootstrap clears the
    exit hooks registered so far; the after-fork callbacks it then runs register ours again."""
    _finalize_at_worker_exit(writer)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        with contextlib.suppress(Exception):
            mp_util.register_after_fork(writer, _close_with_multiprocessing_again)


def _close_with_multiprocessing_again(writer: Any) -> None:
    active = _active
    if active is not None and active.writer is writer and active.pid == os.getpid():
        _finalize_at_worker_exit(writer)


def _close_fork_child_writer(writer: Any) -> None:
    """multiprocessing's exit hook in a forked worker: the same exit path as atexit."""
    active = _active
    if active is not None and active.writer is writer and active.pid == os.getpid():
        _finish_process(active)
    else:
        writer.close()
