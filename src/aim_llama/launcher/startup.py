"""What the launcher's start-up hook does in every Python process it reaches.

Called from the bootstrap `sitecustomize.py` while the interpreter starts, so it must be nearly
free: it looks at the command line to leave tools alone (pip, the `aim` CLI), then imports
`aim_llama.auto`, which only installs a post-import hook. In strict mode a configuration error
ends the process with the one-line message and status 1, as the failing import would.
"""

from __future__ import annotations

import os
import sys

# Commands never instrumented: package installers and Aim's own CLI (`aim up` reads the repo).
SKIP_COMMANDS = frozenset({"pip", "pip3", "aim", "aim_llama", "aim-llama"})


def command_name(orig_argv: list[str] | None = None, argv0: str | None = None) -> str:
    """The program this interpreter runs: `-m` module's top package, or the script's base name."""
    orig: list[str] = list(getattr(sys, "orig_argv", ()) if orig_argv is None else orig_argv)
    arg0: str = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    if arg0 == "-m" or not arg0:
        return _module_name(orig)
    if arg0 in ("", "-c", "-"):
        return ""
    name = os.path.basename(arg0).lower()
    for suffix in (".exe", "-script.py", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _module_name(orig: list[str]) -> str:
    """The top package of `-m` in an interpreter command line (`-m pip`, `-mpip`, `-Bm pip`)."""
    i = 1
    while i < len(orig):
        token = orig[i]
        if token == "--check-hash-based-pycs":
            i += 2
            continue
        if token.startswith("--"):
            i += 1
            continue
        if not token.startswith("-") or token == "-":
            return ""  # a script, or stdin: not a module
        for j, flag in enumerate(token[1:], 1):
            rest = token[j + 1:]
            if flag == "m":
                name = rest or (orig[i + 1] if i + 1 < len(orig) else "")
                return name.partition(".")[0]
            if flag in "cWX":  # takes an argument: the rest of the token or the next one
                if flag == "c":
                    return ""
                if not rest:
                    i += 1
                break
        i += 1
    return ""


def is_skipped(name: str) -> bool:
    """True for commands aim-llama must never instrument (`pip`, `pip3.11`, `aim`, ...)."""
    if name in SKIP_COMMANDS:
        return True
    return name.startswith("pip") and name[3:].replace(".", "").isdigit()


def activate() -> None:
    """Activate aim-llama lazily for this process unless it runs a tool we leave alone."""
    try:
        if is_skipped(command_name()):
            return
    except Exception:
        return
    from ..errors import ConfigError

    try:
        import aim_llama.auto  # noqa: F401  (installs the post-import hook; nothing heavy)
    except ConfigError as exc:  # strict mode (auto ends the process first, under `site`)
        exit_at_start_up(f"aim_llama: error: {exc}")
    except Exception as exc:  # never break a program that merely inherited our PYTHONPATH
        try:
            from ..log import warn_once

            warn_once("bootstrap", "aim-llama start-up hook failed (%s: %s); not instrumenting",
                      type(exc).__name__, exc)
        except Exception:
            pass


def exit_at_start_up(message: str) -> None:
    """Print `message` and end the process with status 1 (SystemExit is fatal inside `site`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(1)  # SystemExit is fatal during `site` start-up; leave with the error status
