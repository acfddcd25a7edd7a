"""The `aim-llama` command: `config` shows the effective settings; `run` launches a program instrumented."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def _cmd_config(args: argparse.Namespace) -> int:
    from .errors import ConfigError, one_line
    from .settings import ENV_NAMES, check_resolvable, load_settings, redact_for_display

    try:
        if args.file is not None:  # (as the launcher's --config: relative to where it was typed)
            from .switches import COMMAND_LINE_ENV, CONFIG_ENV, value_digest

            path = os.path.abspath(os.path.expanduser(args.file))
            os.environ[CONFIG_ENV] = path
            # messages name the option typed, not a variable the user never set
            kept = [part for part in os.environ.get(COMMAND_LINE_ENV, "").split(";")
                    if part and not part.startswith(f"{CONFIG_ENV}=")]
            os.environ[COMMAND_LINE_ENV] = ";".join(
                [*kept, f"{CONFIG_ENV}=config --file@{value_digest(path)}"])
        loaded = load_settings()
        check_resolvable(loaded)
    except ConfigError as exc:
        print(f"aim-llama: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # reading the configuration failed some other way: still one line
        print(f"aim-llama: error: could not read the configuration ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    for note in loaded.warnings:  # (something skipped: the settings below stand)
        print(f"aim-llama: warning: {note}", file=sys.stderr)
    # (values are shown as they are, `実験` not `\u5b9f\u9a13`: where the output cannot
    # encode them — an ASCII terminal, a cp1252 file — as escapes, never a traceback)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    rows: list[dict[str, Any]] = []
    for name, value in loaded.settings.model_dump().items():
        rows.append(
            {
                "setting": name,
                "value": redact_for_display(name, value),
                "source": loaded.sources[name],
                "env": ENV_NAMES[name],
            }
        )
    if args.json:  # (an unset repo or experiment keeps its null; "means" says what it is)
        shown: dict[str, dict[str, Any]] = {}
        for r in rows:
            shown[r["setting"]] = {"value": r["value"], "source": r["source"]}
            if r["value"] is None and r["setting"] in _UNSET_MEANS:
                shown[r["setting"]]["means"] = _UNSET_MEANS[r["setting"]]()[0]
        print(json.dumps(shown, indent=2, default=str))  # (ASCII: valid JSON on any output)
        return 0
    width = max(len(r["setting"]) for r in rows)
    for r in rows:
        value = one_line(json.dumps(r["value"], default=str, ensure_ascii=False))
        source = r["source"]
        if r["value"] is None and r["setting"] in _UNSET_MEANS:
            effective, meaning = _UNSET_MEANS[r["setting"]]()
            value, source = json.dumps(effective, ensure_ascii=False), f"{source}: {meaning}"
        print(f"{r['setting']:<{width}}  {value:<30}  ({source})")
    return 0


def _default_repo() -> tuple[str, str]:
    from .switches import here

    base = here()  # (None: a deleted working directory, which validation reports first)
    if base is None:
        return "", "the working directory no longer exists"
    return os.path.join(base, ".aim"), ".aim in the working directory"


# What an unset setting means (the table shows it; `--json` keeps the null and adds "means")
_UNSET_MEANS = {
    "repo": _default_repo,
    "experiment": lambda: ("default", "Aim's default experiment"),
}


def _cmd_run(args: argparse.Namespace) -> int:
    from .launcher import run_command

    return int(run_command(args))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_command

    return doctor_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="aim-llama",
        description="Record what LlamaIndex applications do into the Aim experiment tracker.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"aim-llama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser(
        "config",
        help="print the effective settings and where each came from; exit 1 if invalid",
        description="Print the effective settings and where each came from (keyword, env "
                    "variable, file and key, or default); exit 1 with the one-line error if "
                    "they are invalid.",
    )
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.add_argument("--file", metavar="PATH",
                        help="read settings from this TOML file (as AIM_LLAMA_CONFIG=PATH "
                             "would), e.g. to check a file before using it")
    config.set_defaults(func=_cmd_config)
    try:
        from .launcher import add_run_parser
    except ImportError:  # pragma: no cover - launcher not available
        pass
    else:
        add_run_parser(sub, _cmd_run)
    from .doctor import add_doctor_parser

    add_doctor_parser(sub, _cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `aim-llama` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    typed_before = words[:words.index(args.command)] if args.command in words else words
    if any(word in typed_before for word in unknown):  # `aim-llama --bogus config`
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:  # said by the subcommand's parser, with its usage (not the top-level one)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `aim-llama config | head -1`: the reader left; end as a program killed by SIGPIPE
        # would, without a traceback (and without Python's own failing flush at exit)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return result
