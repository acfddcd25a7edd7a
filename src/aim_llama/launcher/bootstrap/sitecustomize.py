"""aim-llama's start-up hook: `aim-llama run` puts this directory first on PYTHONPATH.

Two steps, both cheap: run the user's own `sitecustomize` found further down `sys.path` (so
ours never shadows it), then activate aim-llama lazily through `aim_llama.launcher.startup`.
Nothing heavy is imported until the program itself imports LlamaIndex. Written for any
Python 3 interpreter, because an app may start an interpreter where aim-llama is not installed.
"""

import os
import sys


def _report(exc: BaseException) -> None:
    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:
        sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                         f"{type(exc).__name__}: {exc}\n")


def _chain_user_sitecustomize(here: str) -> None:
    """Import the next `sitecustomize` on sys.path (ours removed); report its errors as `site` does."""
    key = os.path.normcase(here)
    sys.path[:] = [p for p in sys.path if os.path.normcase(os.path.abspath(p or os.curdir)) != key]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        __import__("sitecustomize")  # the user's, now that ours is out of the way
    except ImportError as exc:
        if exc.name != "sitecustomize":
            _report(exc)
    except Exception as exc:
        _report(exc)
    if "sitecustomize" not in sys.modules and ours is not None:
        sys.modules["sitecustomize"] = ours


def _is_the_command(marker: "str | None") -> bool:
    """`aim-llama run` sets `pid=N` (exec: the command keeps the launcher's pid N) or `ppid=N`
    (--spawn: the command is its child); Pythons that a shell command starts are neither."""
    kind, _, pid = (marker or "").partition("=")
    try:
        return (os.getpid() if kind == "pid" else os.getppid() if kind == "ppid" else -1) == int(pid)
    except ValueError:
        return False


def _bootstrap() -> None:
    launched = _is_the_command(os.environ.pop("AIM_LLAMA_LAUNCHED", None))
    _chain_user_sitecustomize(os.path.dirname(os.path.abspath(__file__)))
    try:
        from aim_llama.launcher.startup import activate
    except ImportError as exc:
        if launched:  # the command itself runs a Python without aim-llama: say so, once
            sys.stderr.write(f"aim-llama: {sys.executable} cannot import aim_llama ({exc}); "
                             "install aim-llama in that environment. Running uninstrumented.\n")
        return  # otherwise (a tool started by the program) stay out of the way
    activate()


_bootstrap()
