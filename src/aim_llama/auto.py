"""`import aim_llama.auto` — activate aim-llama for this process, with settings from env / TOML.

Cheap by design: if the kill switch is off it returns at once; otherwise it instruments now
when LlamaIndex is already imported, or waits (a post-import hook) until the application
imports `llama_index.core`. It imports neither LlamaIndex, Aim nor pydantic-settings before
that moment. It never raises, unless strict mode is on. The launcher's start-up hook
(`aim-llama run`) activates through this same module, so every path behaves the same.
"""

from __future__ import annotations

import os
import sys

from .importhook import after_module, initializing, when_imported

_FALSE = {"0", "false", "no", "off", "n", "f"}

ROLE_ENV = "AIM_LLAMA_ROLE"
PROPAGATE_ENV = "AIM_LLAMA_PROPAGATE"
# Directory of the launcher's start-up `sitecustomize.py` (what `aim-llama run` puts on PYTHONPATH).
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher", "bootstrap")
_BOOTSTRAP_KEY = os.path.normcase(BOOTSTRAP_DIR)

# pid of the process that activated; survives `importlib.reload` so activation runs once per process.
_activated_pid: int = globals().get("_activated_pid", 0)
# The working directory at activation: the deferred instrumentation reads its settings there.
_home: str | None = globals().get("_home")


def _env_is(name: str, words: set[str]) -> bool:
    return os.environ.get(name, "").strip().lower() in words


_BOOTSTRAP_TAIL = os.path.normcase(os.path.join("aim_llama", "launcher", "bootstrap"))


def _is_bootstrap(entry: str) -> bool:
    path = os.path.normcase(os.path.abspath(entry))
    return path == _BOOTSTRAP_KEY or path.endswith(os.sep + _BOOTSTRAP_TAIL)


def strip_bootstrap_from_env(environ: dict[str, str] | None = None) -> None:
    """Remove the launcher's bootstrap directory from PYTHONPATH so child processes start plain."""
    env = os.environ if environ is None else environ
    value = env.get("PYTHONPATH", "")
    if not value:
        return
    entries = value.split(os.pathsep)
    # An empty entry means the working directory to Python: it is the user's, keep it. Any
    # aim-llama install's bootstrap goes (a launcher from pipx may drive a project's venv).
    kept = [e for e in entries if not e or not _is_bootstrap(e)]
    if len(kept) == len(entries):
        return
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)



def _strict() -> bool:
    """Strict mode from the environment or a TOML file (a file is parsed only if it says `strict`)."""
    try:
        from .switches import switch

        return switch("strict", quick=True) is True
    except Exception:
        return False


# Functions of Python's `site` that run start-up code (sitecustomize, usercustomize, `.pth` lines).
_SITE_RUNNERS = frozenset({"execsitecustomize", "execusercustomize", "addpackage"})
_SITE_FILES = ("site.py", "<frozen site>")


def _imported_by_site() -> bool:
    """True while Python's `site` runs this import at interpreter start-up (its module body
    on the stack: not a program's own later `site.addsitedir`): it would catch strict mode's
    ConfigError, print it and run the program anyway, so strict mode ends the process itself."""
    runner = False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if os.path.basename(code.co_filename) in _SITE_FILES:
            if code.co_name in _SITE_RUNNERS:
                runner = True
            elif code.co_name == "<module>":
                return runner
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _stop_at_start_up(exc: BaseException) -> None:
    """Strict mode from a start-up hook: end the process as the failing import would have,
    except for the tools that must keep working to fix the configuration (pip, aim, aim-llama)."""
    from .launcher.startup import command_name, exit_at_start_up, is_skipped

    try:
        if is_skipped(command_name()):
            return
    except Exception:
        pass
    exit_at_start_up(f"aim_llama: error: {exc}")


# aim-llama's own modules that import LlamaIndex at their top: when the application imports
# one of them first, LlamaIndex finishes importing (and the hook fires) while it is half-run.
_LLAMA_IMPORTING = ("aim_llama.dispatcher", "aim_llama.handler")


def _instrument_now() -> None:
    for name in _LLAMA_IMPORTING:
        if initializing(name):  # activation needs that module: finish when its import ends
            after_module(name, _instrument_now)
            return
    from . import autoinstrument
    from .switches import pinned_directory

    with pinned_directory(_home):  # the files `strict` was read from, whatever the cwd is now
        autoinstrument.instrument()
    active = autoinstrument._active
    if active is not None and not getattr(active.settings, "propagate", True):
        strip_bootstrap_from_env()  # propagate = false (e.g. from TOML): children start plain


def activate() -> None:
    """What importing this module does; runs once per process however often it is called."""
    global _activated_pid
    pid = os.getpid()
    if _activated_pid == pid:
        return
    if _env_is("AIM_LLAMA_ENABLED", _FALSE):
        return
    _activated_pid = pid
    global _home
    try:
        _home = os.getcwd()
    except OSError:
        _home = None
    if _env_is(PROPAGATE_ENV, _FALSE):
        strip_bootstrap_from_env()
    if _strict():
        # Strict mode wants configuration errors at the import line, so validate eagerly —
        # unless a file turns aim-llama off: the kill switch wins over a broken configuration.
        from .settings import load_settings
        from .switches import switch

        if switch("enabled") is False:
            return

        try:
            load_settings()
        except BaseException as exc:
            _activated_pid = 0
            from .errors import ConfigError

            if isinstance(exc, ConfigError) and _imported_by_site():
                _stop_at_start_up(exc)
            raise
    when_imported("llama_index.core", _instrument_now)


activate()
