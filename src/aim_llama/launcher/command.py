"""The `aim-llama run` sub-command: options → child environment, then exec (or spawn) the command.

Every option sets one environment variable for the child, so the child validates it exactly as
if the user had exported it (errors name the env var). The command's exit status comes back
unchanged: with exec it *is* the command; with `--spawn` the launcher waits, forwards signals,
and returns the status (128+N when the command was killed by signal N, as shells report it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..switches import (
    COMMAND_LINE_ENV,
    CONFIG_ENV,
    CONFIG_TEXT_ENV,
    pipe_text,
    read_config,
    switch,
    value_digest,
)
from . import BOOTSTRAP_DIR

PROPAGATE_ENV = "AIM_LLAMA_PROPAGATE"
LAUNCHED_ENV = "AIM_LLAMA_LAUNCHED"


class Option(NamedTuple):
    """One `aim-llama run` option: the setting (TOML key) and the env var it sets for the command."""

    flag: str
    setting: str
    env: str
    metavar: str
    help: str


# One option per setting. Kept here (not generated) so that the launcher never imports
# pydantic; a test checks that it matches `aim_llama.settings.ENV_NAMES`.
OPTIONS: tuple[Option, ...] = (
    Option("--repo", "repo", "AIM_REPO", "PATH|URL", "Aim repo: a directory or aim://host:port"),
    Option("--experiment", "experiment", "AIM_EXPERIMENT", "NAME", "Aim experiment name"),
    Option("--config", "", "AIM_LLAMA_CONFIG", "FILE", "TOML file with aim-llama settings"),
    Option("--system-tracking-interval", "system_tracking_interval", "AIM_SYSTEM_TRACKING_INTERVAL",
           "SECONDS", "system metrics interval; none/off/0 disables"),
    Option("--log-system-params", "log_system_params", "AIM_LOG_SYSTEM_PARAMS", "BOOL",
           "record packages, env, git info on the run"),
    Option("--capture-terminal-logs", "capture_terminal_logs", "AIM_CAPTURE_TERMINAL_LOGS", "BOOL",
           "copy stdout/stderr to the run's logs"),
    Option("--event-starts-to-ignore", "event_starts_to_ignore", "AIM_EVENT_STARTS_TO_IGNORE",
           "TYPES", "LlamaIndex event types, comma-separated"),
    Option("--event-ends-to-ignore", "event_ends_to_ignore", "AIM_EVENT_ENDS_TO_IGNORE", "TYPES",
           "LlamaIndex event types, comma-separated"),
    Option("--run-params", "run_params", "AIM_RUN_PARAMS", "JSON",
           "JSON object of params set on every run"),
    Option("--enabled", "enabled", "AIM_LLAMA_ENABLED", "BOOL", "kill switch: false records nothing"),
    Option("--strict", "strict", "AIM_LLAMA_STRICT", "BOOL",
           "fail on configuration errors instead of running uninstrumented"),
    Option("--queue-size", "queue_size", "AIM_LLAMA_QUEUE_SIZE", "N",
           "records buffered before dropping"),
    Option("--flush-timeout", "flush_timeout", "AIM_LLAMA_FLUSH_TIMEOUT", "SECONDS",
           "max wait for the writer at exit"),
    Option("--writer", "writer", "AIM_LLAMA_WRITER", "process|thread", "where Aim writes happen"),
    Option("--propagate", "propagate", PROPAGATE_ENV, "BOOL",
           "instrument Python child processes too (default true)"),
    Option("--capture-content", "capture_content", "AIM_LLAMA_CAPTURE_CONTENT", "BOOL",
           "record prompt/response texts (false: metrics, token counts and the trace structure only)"),
    Option("--max-text-length", "max_text_length", "AIM_LLAMA_MAX_TEXT_LENGTH", "N",
           "truncate recorded texts; none/off/0 for no limit"),
    Option("--redact", "redact", "AIM_LLAMA_REDACT", "REGEXES",
           "regular expressions masked in recorded texts (JSON list or comma-separated)"),
    Option("--redact-secrets", "redact_secrets", "AIM_LLAMA_REDACT_SECRETS", "BOOL",
           "mask API keys and tokens in recorded texts"),
    Option("--sample-rate", "sample_rate", "AIM_LLAMA_SAMPLE_RATE", "FRACTION",
           "fraction of root requests whose texts are recorded"),
)


def env_for(name: str) -> str | None:
    """The env var of a setting named by TOML key, option name, or env name (`--set NAME=VALUE`)."""
    key = name.strip().lstrip("-").replace("-", "_")
    for opt in OPTIONS:
        if key.upper() == opt.env or (opt.setting and key.lower() == opt.setting):
            return opt.env
    try:  # a setting newer than this table: ask the settings model (imports pydantic)
        from ..settings import ENV_NAMES
    except Exception:
        return None
    return ENV_NAMES.get(key.lower()) or (key.upper() if key.upper() in ENV_NAMES.values() else None)


def _close_setting(name: str) -> str:
    """`; did you mean 'sample_rate'?` for a typed setting name close to a real one, or ''."""
    try:
        import difflib

        from ..settings import ENV_NAMES
    except Exception:
        return ""
    key = name.strip().lstrip("-").replace("-", "_")
    if key.isupper():  # an environment name (`AIM_LLAMA_QUEUESIZE`): one of those
        close = difflib.get_close_matches(key, sorted(ENV_NAMES.values()), n=1, cutoff=0.8)
    else:
        close = difflib.get_close_matches(key.lower(), sorted(ENV_NAMES), n=1, cutoff=0.8)
    return f"; did you mean {close[0]!r}?" if close else ""


def _dest(opt: Option) -> str:
    return "opt_" + opt.flag[2:].replace("-", "_")


class _Noted(argparse.Action):
    """Stores an option as argparse would (its value, its constant, or `--set`'s list) and
    notes each one typed, in order, in `opt_typed`: a setting given twice is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = self.const if self.nargs == 0 else values
        namespace.opt_typed = [*(getattr(namespace, "opt_typed", None) or []),
                               (str(option_string), value)]
        if self.dest == "opt_set":
            value = [*(getattr(namespace, self.dest, None) or []), value]
        setattr(namespace, self.dest, value)


# The env var each flag sets (the options, and the two shortcuts).
_FLAG_ENV = {**{opt.flag: opt.env for opt in OPTIONS}, "--no-propagate": PROPAGATE_ENV,
             "--disable": "AIM_LLAMA_ENABLED"}


def _given_twice(typed: list[tuple[str, Any]]) -> str | None:
    """Why a command line sets one setting twice (`--queue-size 300 --set queue_size=200`), or
    None: whichever came last would win silently."""
    seen: dict[str, str] = {}
    for flag, value in typed:
        if flag == "--set":
            name, sep, _ = str(value).partition("=")
            var, shown = (env_for(name) if sep else None), f"--set {name.strip()}"
        else:
            var, shown = _FLAG_ENV.get(flag), flag
        if var is None:
            continue  # (a bad --set: said on its own)
        if var in seen:
            both = (f"{shown} is given twice" if seen[var] == shown
                    else f"{seen[var]} and {shown} both set {var}")
            return f"{both}; give each setting once"
        seen[var] = shown
    return None


def add_run_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add `run` to the `aim-llama` CLI; each option is documented with the env var it sets."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run a command with aim-llama active (no code changes): aim-llama run -- python app.py",
        description=(
            "Run CMD with aim-llama active in every Python process it starts, without touching "
            "its code. The options set the matching environment variables for CMD (unset ones "
            "keep their env / TOML values). The exit status is CMD's."
        ),
        epilog="example: aim-llama run --repo ./runs --experiment rag -- python app.py",
    )
    for opt in OPTIONS:
        if opt.flag == "--strict":  # a bare flag: `--strict python app.py` must not eat `python`
            parser.add_argument(opt.flag, dest=_dest(opt), action=_Noted, nargs=0, const="true",
                                default=None, help=f"{opt.help} (sets {opt.env}=true)")
            continue
        parser.add_argument(
            opt.flag, dest=_dest(opt), action=_Noted, metavar=opt.metavar, default=None,
            help=f"{opt.help} (sets {opt.env})",
        )
    parser.add_argument(
        "--no-propagate", dest="opt_propagate", action=_Noted, nargs=0, const="false",
        help=f"instrument only CMD itself, not the Python processes it starts (sets {PROPAGATE_ENV}=false)",
    )
    parser.add_argument(
        "--disable", dest="opt_enabled", action=_Noted, nargs=0, const="false",
        help="run CMD with aim-llama switched off (sets AIM_LLAMA_ENABLED=false)",
    )
    parser.add_argument(
        "--set", dest="opt_set", action=_Noted, default=[], metavar="NAME=VALUE",
        help="any setting by TOML key or env name, e.g. --set capture_content=false",
    )
    parser.add_argument(
        "--spawn", action="store_true",
        help="keep the launcher as CMD's parent (forwarding signals) instead of exec-ing CMD",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                        help="the command to run, e.g. python app.py, python -m pkg, uvicorn app:app")
    parser.set_defaults(func=func)
    return parser


def prepend_bootstrap(pythonpath: str | None) -> str:
    """PYTHONPATH with the bootstrap directory first (and only once); the user's entries stay
    as they were, empty ones included (Python reads an empty entry as the working directory)."""
    key = os.path.normcase(BOOTSTRAP_DIR)
    if not pythonpath:
        return BOOTSTRAP_DIR
    rest = [p for p in pythonpath.split(os.pathsep)
            if not p or os.path.normcase(os.path.abspath(p)) != key]
    return os.pathsep.join([BOOTSTRAP_DIR, *rest])


# Settings that name a file or directory: made absolute when typed on the command line.
_PATHS = frozenset({"AIM_REPO", "AIM_LLAMA_CONFIG"})


def child_env(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: ours, plus the options' env vars, plus the bootstrap on PYTHONPATH."""
    env = dict(os.environ if environ is None else environ)
    twice = _given_twice(getattr(args, "opt_typed", None) or [])
    if twice is not None:
        raise ValueError(twice)
    given: dict[str, str] = {}  # the env vars this command line sets, and the option typed
    for item in getattr(args, "opt_set", None) or []:
        name, sep, value = str(item).partition("=")
        var = env_for(name) if sep else None
        if var is None:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME an aim-llama setting"
                             f"{_close_setting(name) if sep else ''} (see `aim-llama config`)")
        env[var] = value
        given[var] = f"--set {name.strip()}"
    for opt in OPTIONS:
        option = getattr(args, _dest(opt), None)
        if option is not None:
            env[opt.env] = str(option)
            given[opt.env] = opt.flag
    for var in _PATHS & given.keys():  # typed on this command line: relative to where it was typed
        if env[var].strip():
            env[var] = _absolute(env[var])
    if switch("propagate", env) is False:
        env[PROPAGATE_ENV] = "false"  # the bootstrap takes itself off PYTHONPATH for grandchildren
    text = _pipe_config(env)
    if text is not None:  # the command would find the pipe empty (or, spawned, closed)
        env[CONFIG_TEXT_ENV] = text
    env["PYTHONPATH"] = prepend_bootstrap(env.get("PYTHONPATH"))
    if given:  # (messages about these values name the option, not the variable)
        outer = dict(part.partition("=")[::2] for part in env.get(COMMAND_LINE_ENV, "").split(";")
                     if "=" in part)  # (an outer `aim-llama run`'s)
        typed = {var: f"{flag}@{value_digest(env[var])}" for var, flag in given.items()}
        env[COMMAND_LINE_ENV] = ";".join(f"{var}={option}"
                                         for var, option in {**outer, **typed}.items())
    # Only the command's own process may say that it cannot import aim_llama (see the bootstrap):
    # exec keeps the launcher's pid; a spawned command is the launcher's child.
    mode = "ppid" if getattr(args, "spawn", False) or os.name == "nt" else "pid"
    env[LAUNCHED_ENV] = f"{mode}={os.getpid()}"
    return env


def _pipe_config(env: Mapping[str, str]) -> str | None:
    """The text of the config file `env` names if it is a pipe (read here, once); None for a
    regular file, none at all, or one that cannot be read (the command reports that)."""
    named = env.get(CONFIG_ENV, "").strip()
    if not named:
        return None
    path = os.path.expanduser(named)
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return None
        read_config(path)
    except (OSError, ValueError):
        return None
    return pipe_text(path)


def _absolute(value: str) -> str:
    """A path made absolute against the launcher's working directory; URLs stay as they are."""
    text = value.strip()
    if "://" in text or text[:4].lower() == "aim:":  # (`aim:host:1`, misspelt: the command says so)
        return value
    try:
        return os.path.abspath(os.path.expanduser(text))
    except (OSError, RuntimeError):  # deleted working directory, unknown ~user: the child says so
        return value


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(getattr(args, "cmd", None) or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: the exit code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
# What a terminal sends to its whole foreground process group (Ctrl-C, Ctrl-\, a resize, a
# hang-up): the command, in the launcher's group, has it already.
_FROM_TERMINAL = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGQUIT", "SIGWINCH",
                                                              "SIGHUP") if hasattr(signal, name))
# Python ignores these at start-up; an ignored signal stays ignored across exec, so the command
# would never die of a broken pipe (`aim-llama run -- seq 1 1000000 | head -1`).
_PYTHON_IGNORES = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ")
                        if hasattr(signal, name))


def _from_terminal() -> bool:
    """Whether a SIGINT most likely came from the terminal's Ctrl-C: the launcher is in the
    terminal's foreground process group, so the command (in the same group) got it too."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.isatty():
                return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _spawn(cmd: list[str], env: dict[str, str]) -> int:
    proc: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # signals that came before the command was started

    def forward(signum: int, _frame: Any) -> None:
        if signum in _FROM_TERMINAL and _from_terminal():
            return  # it reached the whole foreground group: the command has it already
        if proc is None:
            pending.append(signum)
            return
        try:
            proc.send_signal(signum)
        except OSError:
            pass

    previous: dict[int, Any] = {}
    for name in _FORWARDED:
        signum = getattr(signal, name, None)
        # A signal the launcher was started with ignored (`nohup`, a background job's SIGINT)
        # stays ignored, in the command too: it inherits the disposition as exec would.
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, forward)
    try:
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            return _cannot_start(cmd, exc)
        for signum in pending:
            forward(signum, None)
        return exit_status(proc.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _cannot_start(cmd: list[str], exc: OSError) -> int:
    """One line and the shell's status: 127 for a command not found, 126 for one that cannot be
    executed (permission, "Exec format error", a file on the way …)."""
    if isinstance(exc, FileNotFoundError):
        print(f"aim-llama run: command not found: {cmd[0]!r}", file=sys.stderr)
        return 127
    print(f"aim-llama run: cannot execute {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
    return 126


_PYTHON = re.compile(r"python[0-9.]*[dmtw]?(\.exe)?$")
_ARG_OPTIONS = "WX"  # options whose value may follow as the next argument (`-W error`)
_IGNORING = {"I": "ignores PYTHONPATH (isolated mode)", "E": "ignores PYTHONPATH",
             "S": "skips site and sitecustomize"}


def ignoring_options(cmd: list[str]) -> list[str]:
    """The interpreter options of a `python …` command that keep aim-llama's start-up hook
    from loading (`-I`, `-E`, `-S`, alone or combined as `-IB`), in order; [] for anything
    else (another program, or those letters after `-c` / `-m` / the script: its own)."""
    if not cmd or not _PYTHON.match(os.path.basename(cmd[0]).lower()):
        return []
    found: list[str] = []
    i = 1
    while i < len(cmd):
        token = cmd[i]
        if token == "--" or token == "-" or not token.startswith("-"):
            break
        if token.startswith("--"):
            i += 2 if token == "--check-hash-based-pycs" else 1
            continue
        for at, letter in enumerate(token[1:], 1):
            if letter in "cm":
                return found
            if letter in _IGNORING and f"-{letter}" not in found:
                found.append(f"-{letter}")
            if letter in _ARG_OPTIONS:
                if at == len(token) - 1:
                    i += 1  # its value is the next argument
                break  # the rest of the token is its value
        i += 1
    return found


def run_command(args: argparse.Namespace) -> int:
    """Run the command with aim-llama active; returns its status (exec: does not return on success)."""
    cmd = _command(args)
    if not cmd:
        print("aim-llama run: missing command, e.g. aim-llama run -- python app.py", file=sys.stderr)
        return 2
    try:
        env = child_env(args)
    except ValueError as exc:  # (a ConfigError is masked already; any other may quote a value)
        from ..errors import mask_secrets, one_line

        print(f"aim-llama run: error: {one_line(mask_secrets(str(exc)))}", file=sys.stderr)
        return 2
    ignoring = ignoring_options(cmd)
    if ignoring:  # it would record nothing and say nothing: say it
        print(f"aim-llama run: {os.path.basename(cmd[0])} {' '.join(ignoring)} "
              f"{'; '.join(_IGNORING[o[1]] for o in ignoring)}: aim-llama's start-up hook does "
              f"not load there (drop the option, or add `import aim_llama.auto` to the "
              f"program)",
              file=sys.stderr)
    if getattr(args, "spawn", False) or os.name == "nt":  # Windows has no real exec
        return _spawn(cmd, env)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # (closed by the caller: `aim-llama run … >&-`)
            stream.flush()
    restored = {signum: signal.signal(signum, signal.SIG_DFL) for signum in _PYTHON_IGNORES}
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        for signum, handler in restored.items():
            signal.signal(signum, handler)
        return _cannot_start(cmd, exc)
    return 0  # pragma: no cover - execvpe does not return
