"""`aim-llama run -- CMD ...`: launch any command with aim-llama active, without touching its code.

The launcher only edits the child's environment (settings from its options, the bootstrap
directory first on PYTHONPATH) and execs the command; the bootstrap `sitecustomize.py` does the
rest in each Python process. This package stays import-light because the start-up hook imports
`aim_llama.launcher.startup`; the argparse/exec code lives in `aim_llama.launcher.command`.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import argparse
    from collections.abc import Callable
    from typing import Any

# The directory `aim-llama run` puts first on PYTHONPATH (it holds only `sitecustomize.py`).
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")

__all__ = ["BOOTSTRAP_DIR", "add_run_parser", "run_command"]


def add_run_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add the `run` sub-command (its options map to aim-llama settings) to the CLI's subparsers."""
    from .command import add_run_parser as add

    return add(subparsers, func)


def run_command(args: argparse.Namespace) -> int:
    """Launch `args.cmd` instrumented; returns its exit status (128+N when killed by signal N)."""
    from .command import run_command as run

    return run(args)
