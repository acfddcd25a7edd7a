"""Turn aim-llama on and off: `instrument()`, `uninstrument()`, `is_instrumented()`, `flush()`.

Idempotent and thread-safe: however many times activation runs (imports of `aim_llama.auto`,
calls to `instrument()`, the start-up hook), one handler sits on LlamaIndex's global callback
manager and one writer owns the process's Aim run. Failures are logged once and the
application carries on uninstrumented, unless strict mode asks for an exception.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .log import warn_once

log = logging.getLogger("aim_llama")

_lock = threading.RLock()
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


@dataclass
class _Active:
    handler: Any
    writer: Any
    settings: Any
    callback_manager: Any
    signals: Any
    tee: Any
    pid: int


_active: _Active | None = None
_atexit_registered = False
_fork_hook_registered = False


def _env_flag(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    return None


def _strict_requested(overrides: dict[str, Any]) -> bool:
    """Best-effort strictness when the configuration itself could not be validated."""
    if "strict" in overrides:
        return overrides["strict"] in (True, "true", "1", 1)
    env = _env_flag("AIM_LLAMA_STRICT")
    if env is not None:
        return env
    try:
        from .settings import config_file_path

        path, _ = config_file_path(os.environ)
        if path is not None and path.is_file():
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            with open(path, "rb") as fh:
                return tomllib.load(fh).get("strict") is True
    except Exception:
        return False
    return False


def _report_config_error(exc: ConfigError) -> None:
    warn_once(f"config:{exc}", "%s — running without Aim instrumentation", str(exc))


def is_instrumented() -> bool:
    """True when aim-llama's handler is registered in this process."""
    return _active is not None and _active.pid == os.getpid()


def instrument(**overrides: Any) -> bool:
    """Register aim-llama on LlamaIndex using settings (kwargs > env > TOML files > defaults).

    Returns True when instrumentation is active after the call. Never raises unless strict
    mode is on, in which case a bad configuration raises `ConfigError` and any other failure
    propagates.
    """
    global _active
    with _lock:
        if is_instrumented():
            if overrides:
                log.debug("aim-llama is already instrumented; ignoring %s", sorted(overrides))
            return True
        if "enabled" not in overrides and _env_flag("AIM_LLAMA_ENABLED") is False:
            return False  # the kill switch wins even over a broken configuration
        try:
            from .settings import load_settings

            loaded = load_settings(overrides)
        except ConfigError as exc:
            if _strict_requested(overrides):
                raise
            _report_config_error(exc)
            return False
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


def _run_config(settings: Any, role: str) -> Any:
    from . import __version__
    from .aimrun import RunConfig

    return RunConfig(
        repo=settings.repo,
        experiment=settings.experiment,
        system_tracking_interval=settings.system_tracking_interval,
        log_system_params=settings.log_system_params,
        run_params=dict(settings.run_params),
        app_pid=os.getpid(),
        argv=tuple(sys.argv),
        executable=sys.executable,
        writer=settings.writer,
        role=role,
        version=__version__,
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

    from .handler import AimLlamaHandler
    from .lifecycle import SignalChain, TerminalTee
    from .records import TerminalOutput

    writer = _new_writer(settings, os.environ.get("AIM_LLAMA_ROLE", "main"))
    handler = AimLlamaHandler(
        writer.submit,
        event_starts_to_ignore=settings.event_starts_to_ignore,
        event_ends_to_ignore=settings.event_ends_to_ignore,
    )
    manager = LlamaSettings.callback_manager  # LlamaIndex creates one if there is none
    for existing in list(manager.handlers):
        if isinstance(existing, AimLlamaHandler):
            manager.remove_handler(existing)
    manager.add_handler(handler)

    tee = None
    if settings.capture_terminal_logs:

        def to_logs(text: str) -> None:
            active = _active
            if active is not None and active.writer._started:
                active.writer.submit(TerminalOutput(text))

        tee = TerminalTee(to_logs)
        tee.install()

    signals = SignalChain(_on_signal)
    signals.install()
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    return _Active(handler, writer, settings, manager, signals, tee, os.getpid())


def flush(timeout: float | None = None) -> bool:
    """Block until everything recorded so far is stored in the Aim repo (or `timeout` passes)."""
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
    global _active
    with _lock:
        active, _active = _active, None
        if active is None:
            return
        with contextlib.suppress(Exception):
            active.callback_manager.remove_handler(active.handler)
        if active.tee is not None:
            active.tee.uninstall()
        active.signals.uninstall()
        if active.pid == os.getpid():
            active.writer.close()


def _at_exit() -> None:
    active = _active
    if active is not None and active.pid == os.getpid():
        if active.tee is not None:
            active.tee.uninstall()
        active.writer.close()


def _on_signal(signum: int) -> None:
    active = _active
    if active is not None and active.pid == os.getpid():
        if active.tee is not None:
            active.tee.uninstall()
        active.writer.close()


def _after_fork_in_child() -> None:
    """A forked child must not touch the parent's run: give it a fresh writer (and run) of its own."""
    global _active, _lock
    _lock = threading.RLock()  # the parent may have held it while forking
    active = _active
    if active is None:
        return
    from .log import reset_reported

    reset_reported()
    writer = _new_writer(active.settings, "fork-child")
    active.handler.submit = writer.submit
    active.writer = writer
    active.pid = os.getpid()
