"""`aim-llama doctor`: is this configuration going to record anything, and if not, why?

One line per check — configuration, then the repo (a local directory: creatable and
writable; an aim:// server: reachable, speaking Aim's protocol, a compatible version), and
with `--probe` a real run written through aim-llama's own writer path and read back. Every
failure comes with a fix; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import remote

PROBE_EXPERIMENT = "aim-llama-doctor"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: a name, whether it passed, what was seen, how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # passed, but says what was skipped

    def line(self) -> str:
        """`ok    name  detail`, `warn  name  detail` or `FAIL  name  detail; fix: ...`."""
        status = "FAIL" if not self.ok else "warn" if self.warning else "ok"
        text = f"{status:<4}  {self.name:<9} {self.detail}"
        if not self.ok and self.fix:
            text += f"; fix: {self.fix}"
        from .errors import one_line

        return one_line(text)  # (a path with a newline in it must not break the line)


def check_config() -> tuple[list[Check], Any]:
    """Validate the settings exactly as activation does; returns the checks (the outcome, then
    a warning per thing skipped) and the settings (None if invalid)."""
    from .errors import ConfigError
    from .settings import check_resolvable, load_settings
    from .switches import switch_source

    enabled, source = switch_source("enabled")
    # (the kill switch wins at activation, which then reads nothing else; the checks still
    # run, as `aim-llama config` validates: for the day it is switched on)
    off = [Check("config", True, f"recording is off: enabled = false ({source}), the kill "
                 "switch; nothing will be recorded (the checks here are for when it is on)",
                 warning=True)] if enabled is False else []
    try:
        loaded = load_settings()
        check_resolvable(loaded)
    except ConfigError as exc:  # (its one line already says what is allowed or what to do)
        return [Check("config", False, str(exc)), *off], None
    except Exception as exc:  # reading the configuration failed some other way
        return [Check("config", False, f"could not read the configuration ({type(exc).__name__}: "
                      f"{exc})", "check AIM_LLAMA_CONFIG and the working directory"), *off], None
    settings = loaded.settings
    where = loaded.sources.get("repo", "default")
    if settings.repo:
        detail = f"valid; repo = {settings.repo} ({where})"
    else:  # as `aim-llama config` shows it
        from .cli import _default_repo

        path, meaning = _default_repo()
        detail = f"valid; repo = {path} (default: {meaning})"
    notes = [Check("config", True, note, warning=True) for note in loaded.warnings]
    return [Check("config", True, detail), *off, *notes], settings


def check_local(repo: str | None) -> list[Check]:
    """A local repo: usable if its `.aim` directory is writable, or can be created."""
    from .aimrun import resolve_repo

    root = Path(resolve_repo(repo))
    aim_dir = root if root.name == ".aim" else root / ".aim"
    if aim_dir.exists():
        if not aim_dir.is_dir():
            return [Check("repo", False, f"{aim_dir} exists and is not a directory",
                          "remove it or point AIM_REPO at another directory")]
        try:
            with tempfile.NamedTemporaryFile(dir=aim_dir, prefix=".aim-llama-doctor-"):
                pass
        except OSError as exc:
            return [Check("repo", False, f"{aim_dir} is not writable ({exc.strerror or exc})",
                          f"make it writable (chmod u+w {aim_dir}) or use another AIM_REPO")]
        return [Check("repo", True, f"local Aim repo {aim_dir} exists and is writable")]
    parent = aim_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [Check("repo", False, f"cannot create {aim_dir}: {parent} is not a directory",
                      "point AIM_REPO at a directory path")]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [Check("repo", False, f"cannot create {aim_dir}: {parent} is not writable",
                      f"make {parent} writable or use another AIM_REPO")]
    try:  # permissions are not everything (root in /proc, a read-only mount): try it
        probe = tempfile.mkdtemp(dir=parent, prefix=".aim-llama-doctor-")
    except OSError as exc:
        return [Check("repo", False, f"cannot create {aim_dir} in {parent} "
                      f"({exc.strerror or exc})", "use another AIM_REPO")]
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return [Check("repo", True, f"local Aim repo {aim_dir} will be created at the first record")]


def check_remote(repo: str, timeout: float) -> list[Check]:
    """An aim:// repo: TCP reachable, answers Aim's tracking protocol, compatible version."""
    try:
        address = remote.parse_address(repo)
    except ValueError as exc:
        return [Check("address", False, str(exc), "write it as aim://host:port")]
    reason = remote.tcp_check(address, timeout)
    if reason is not None:
        return [Check("reachable", False, f"{address.url}: {reason}",
                      f"start the server (aim server --repo DIR --host 0.0.0.0 --port "
                      f"{address.port}) or correct host/port; check firewalls")]
    checks = [Check("reachable", True, f"{address.url} accepts TCP connections")]
    try:
        status = remote.http_json(address, "/status/", timeout)
        version = remote.server_version(address, timeout)
    except Exception as exc:
        reason = ("it answers HTTP, but not with Aim's JSON" if isinstance(exc, ValueError)
                  else remote.describe_failure(exc))
        checks.append(Check("protocol", False,
                            f"{address.url} does not answer as an Aim tracking server ({reason})",
                            "point AIM_REPO at `aim server` (not `aim up`, which serves the UI)"))
        return checks
    checks.append(Check("protocol", True, f"Aim tracking server answers (status {status})"))
    from importlib.metadata import version as dist_version

    client = dist_version("aim")
    if _newer(version, client):
        checks.append(Check("version", False,
                            f"server runs Aim {version}, this client has {client}; Aim refuses "
                            "a client older than its server",
                            f"pip install 'aim=={version}' here, or run the server with {client}"))
    else:
        note = "" if version == client else f" (client {client}: Aim warns, works)"
        checks.append(Check("version", True, f"server runs Aim {version}{note}"))
    return checks


def _newer(a: str, b: str) -> bool:
    """True when version `a` is newer than `b` (numeric comparison of dotted parts)."""

    def parts(v: str) -> tuple[int, ...]:
        out = []
        for piece in v.split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    return parts(a) > parts(b)


def probe(settings: Any, timeout: float, keep: bool = False) -> Check:
    """Write a run through aim-llama's writer path (`RunSink`), read it back through Aim, and
    delete it (unless `keep`: then it stays, to be looked at in `aim up`)."""
    from .aimrun import RunConfig, RunSink, resolve_repo
    from .records import Param, Track

    token = uuid.uuid4().hex
    started = time.monotonic()
    config = RunConfig(
        repo=settings.repo, experiment=PROBE_EXPERIMENT, system_tracking_interval=None,
        log_system_params=False, app_pid=os.getpid(), role="doctor", flush_timeout=timeout,
    )
    sink = RunSink(config)
    sink.apply([
        Param("aim_llama_probe", {"token": token}),
        Track("doctor_probe", 42.0, "metric", {"kind": "doctor"}, 0),
        Track("doctor_probe_text", "hello from aim-llama doctor", "text", {"kind": "doctor"}, 0),
    ])
    run_hash = sink.run_hash
    if run_hash is None:
        reason = sink.failed or "the repo could not be reached"
        return Check("probe", False, f"could not create a run ({reason})",
                     "fix what the reason (and any error above) says, then run "
                     "`aim-llama doctor --probe` again")
    if not sink.close(timeout) or sink.lost:
        return Check("probe", False,
                     f"run {run_hash}: {sink.lost} of 3 records not stored within {timeout:g}s",
                     "check the server's log and disk space; raise AIM_LLAMA_FLUSH_TIMEOUT")
    try:
        got_token, values = _read_back(resolve_repo(settings.repo), run_hash, keep)
    except Exception as exc:
        return Check("probe", False, f"run {run_hash} written but not readable: "
                     f"{remote.describe_failure(exc)}", "check the repo with `aim runs ls`")
    if got_token != token or values != [42.0]:
        return Check("probe", False, f"run {run_hash} read back wrong data ({got_token!r}, "
                     f"{values!r})", "the repo may be shared with an incompatible Aim version")
    took = time.monotonic() - started
    done = f"kept it (experiment {PROBE_EXPERIMENT!r})" if keep else "removed it"
    return Check("probe", True, f"wrote run {run_hash} (param, metric, text), read it back and "
                 f"{done} in {took:.1f}s")


def _read_back(repo: str, run_hash: str, keep: bool = False) -> tuple[Any, list[float]]:
    """Reopen the run through Aim's SDK (works for local and aim:// repos), then delete it
    unless `keep`."""
    from aim import Repo, Run  # type: ignore[attr-defined]
    from aim.storage.context import Context

    from .aimexit import patch_aim_exit_cleanup

    patch_aim_exit_cleanup()

    run = Run(run_hash, repo=repo, system_tracking_interval=None, log_system_params=False,
              capture_terminal_logs=False)
    try:
        token = (run.get("aim_llama_probe") or {}).get("token")
        metric = run.get_metric("doctor_probe", Context({"kind": "doctor"}))
        values = [] if metric is None else [float(v) for v in metric.data.items_list()[1][0]]
    finally:
        run.close()
    if keep:
        return token, values
    aim_repo = Repo.from_path(repo)
    for config, container in list(aim_repo.container_pool.items()):
        if run_hash in str(config):
            container.close()  # flush and release the probe run's files before deleting them
    aim_repo.delete_run(run_hash)
    return token, values


def run_checks(with_probe: bool, timeout: float, keep_probe: bool = False) -> list[Check]:
    """Every check, in order; stops before the repo checks when the configuration is invalid."""
    checks, settings = check_config()
    if settings is None:
        return checks
    if remote.is_remote(settings.repo):
        checks += check_remote(settings.repo, timeout)
    else:
        checks += check_local(settings.repo)
    if with_probe:
        if all(c.ok for c in checks):
            checks.append(probe(settings, timeout, keep_probe))
        else:
            checks.append(Check("probe", False, "skipped: an earlier check failed",
                                "fix the failures above first"))
    return checks


def _seconds(text: str) -> float:
    """A `--timeout` value: a finite number of seconds between 0.1 and one day."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 86_400:  # (NaN fails every comparison)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.1 to 86400")
    return value


def add_doctor_parser(subparsers: Any, func: Any) -> argparse.ArgumentParser:
    """Add `doctor` to the `aim-llama` CLI."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check the configuration and that the Aim repo or server is usable; exit 1 if not",
        description=(__doc__.splitlines()[0].replace("`aim-llama doctor`: ", "").capitalize()
                     if __doc__ else None),
    )
    parser.add_argument("--probe", action="store_true",
                        help="also write a small run through aim-llama, read it back, delete it")
    parser.add_argument("--keep-probe", action="store_true",
                        help="with --probe: leave the probe run in the repo (to see it in aim up)")
    parser.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS",
                        help="network and probe timeout (default 5)")
    parser.set_defaults(func=func)
    return parser


def doctor_command(args: argparse.Namespace) -> int:
    """Print one line per check; 0 when all passed, 1 otherwise."""
    if args.keep_probe and not args.probe:
        print("aim-llama doctor: error: --keep-probe keeps the run of --probe: add --probe",
              file=sys.stderr)
        return 2
    checks = run_checks(bool(args.probe), float(args.timeout), bool(args.keep_probe))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed", file=sys.stderr)
    return 1 if failed else 0
