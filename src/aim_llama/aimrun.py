"""Turns batches of records into one Aim `Run` (with `aimexit` and `fasttrack`, the only
modules that touch Aim's SDK).

Used by the writer, either in a writer process or in a writer thread; never on the
application's thread. It creates the run lazily (at the first record), numbers steps itself
(Aim's own counter is not thread-safe), records system metrics for the *application's* pid,
and finalizes the run on `close()` so Aim never shows it as still active.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import remote
from .aimexit import (
    aim_cleanup_done,
    at_shutdown,
    patch_aim_exit_cleanup,
    patch_aim_status_reporters,
    quiet_aim_cleanup,
    release_aim_exit,
    server_abandoned,
    servers_in_use,
    tolerant_atexit,
)
from .content import DEFAULT_SECRET_PATTERNS, REDACTED, ContentPolicy, unique_name
from .fasttrack import (
    FastTrack,
    context_key,
    group_commit,
    install_group_commit,
    size_memtables_in_this_thread,
)
from .finish import Finisher, storable
from .lifecycle import start_background
from .log import warn_once
from .records import Flush, LogError, Param, Record, TerminalOutput, Track

log = logging.getLogger("aim_llama")

DROPPED_METRIC = "dropped_records"
CONNECT_TIMEOUT = 2.0  # seconds for the TCP check before each attempt to reach an Aim server
STALL_WARNING = 5.0  # seconds without confirmation from a server before we say it is gone
# seconds the writer waits for a server at the buffer bound (see `_await_server`): a healthy
# server on a loaded machine can confirm nothing for over a second (1 s dropped records of a
# healthy server in 1 of 10 runs on a busy 2-vCPU box); one silent this long is called gone
SERVER_PATIENCE = STALL_WARNING


@dataclass(frozen=True)
class RunConfig:
    """What the writer needs to create the run; picklable, built in the application process."""

    repo: str | None = None
    experiment: str | None = None
    system_tracking_interval: int | None = 1
    log_system_params: bool = True
    run_params: dict[str, Any] = field(default_factory=dict)
    app_pid: int = 0
    argv: tuple[str, ...] = ()
    executable: str = ""
    # the application's environment for `__system_params` (secret-looking names already
    # dropped): the writer process runs with an environment of its own
    environment: dict[str, str] | None = None
    writer: str = "process"
    role: str = "main"
    version: str = ""
    flush_timeout: float = 10.0  # how long closing may wait for a remote server
    buffer_size: int = 50_000  # records kept in memory while an aim:// server is unreachable
    # The writer's half of the content policy (`finish.py`): redaction and truncation.
    max_text_length: int | None = 20_000
    redact_patterns: tuple[str, ...] = DEFAULT_SECRET_PATTERNS
    # a writer process started again after the previous one died: continue this run
    run_hash: str | None = None


# A private key printed to the terminal spans lines, which are redacted one by one: the lines
# between these markers are withheld.
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
# (a line of base64 alone, however long: a key kept on one line; blank; PEM headers)
_KEY_BODY = re.compile(r"\s*(?:[A-Za-z0-9+/=]+|(?:Proc-Type|DEK-Info):.*)?\s*")
_KEY_LINES = 1000  # withheld at most (the longest keys have ~120): one-word lines end it then


def resolve_repo(repo: str | None) -> str:
    """An absolute repo path (Aim's default `.aim` in the working directory) or an aim:// URL."""
    if repo and "://" in repo:
        return repo
    path = os.path.expanduser(repo or ".")
    if not os.path.isabs(path):
        from .switches import here

        base = here()  # where `import aim_llama.auto` ran, during the activation it deferred
        if base is not None:
            path = os.path.join(base, path)
    # Aim takes the directory that holds `.aim` (or the `.aim` directory itself).
    return os.path.abspath(path)


def ensure_repo_initialized(repo: str) -> None:
    """Create a new local repo once, under an inter-process lock, before a Run opens it.

    Aim makes `.aim` first and writes `.aim/VERSION` last (after its DB migrations); another
    process opening the repo in between reads it as "out of date" and refuses. Writers that
    start together on a new repo (forked or spawned workers) would lose their runs to that.
    """
    if "://" in repo:
        return
    root = os.path.dirname(repo) if os.path.basename(repo) == ".aim" else repo
    version = os.path.join(root, ".aim", "VERSION")
    if _has_version(version):
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    import hashlib
    import tempfile

    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    lock_path = os.path.join(tempfile.gettempdir(), f"aim-llama-init-{digest}.lock")
    os.makedirs(root, exist_ok=True)
    while True:
        with open(lock_path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                # The holder before us may have removed the file we opened: lock the current one.
                if os.fstat(fh.fileno()).st_ino != os.stat(lock_path).st_ino:
                    continue
            except FileNotFoundError:
                continue
            try:
                if not _has_version(version):
                    from aim.sdk.repo import Repo

                    patch_aim_migrations()
                    Repo.from_path(root, init=True)
            finally:
                # The repo exists now and later openers return early: leave no lock file behind.
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
                fcntl.flock(fh, fcntl.LOCK_UN)
            return


def patch_aim_migrations() -> None:
    """Run Aim's database migration in an empty directory of its own.

    Aim creates (or upgrades) a repo's database in an `alembic` subprocess started in the
    working directory, and alembic reads a `pyproject.toml` there: the application's — broken,
    or with a `[tool.alembic]` of its own — failed it, and no run could be created. The same
    command runs here with another `cwd`; the application's working directory is not touched
    (with the thread writer it is the application's process). Idempotent; an Aim without this
    function is left as it is."""
    try:
        import aim.storage.migrations.utils as utils
        import aim.storage.structured.db as db
    except Exception:  # pragma: no cover - another Aim layout
        return
    original = getattr(db, "upgrade_database", None)
    make_cmd = getattr(utils, "create_migration_cmd", None)
    if original is None or make_cmd is None or getattr(original, "_aim_llama", False):
        return

    def upgrade_database(db_url: str) -> None:
        import shutil
        import subprocess
        import tempfile

        env = dict(os.environ, AIM_RUN_META_DATA_DB_URL=db_url)
        # Imports as they resolved where Aim ran it: the working directory first (`-m`), and
        # relative PYTHONPATH entries (vendored packages, `pip install --target`) from there.
        try:
            here = os.getcwd()
        except OSError:  # (a working directory removed meanwhile)
            pass
        else:
            entries = [here] + [os.path.join(here, entry) for entry in
                                env.get("PYTHONPATH", "").split(os.pathsep) if entry]
            env["PYTHONPATH"] = os.pathsep.join(entries)
        # mkdtemp, not TemporaryDirectory: that one's clean-up is also an exit hook (through
        # `weakref.finalize`), which deleted the directory under a migration still running in
        # the writer thread at exit (its alembic then failed: the whole run lost).
        try:
            scratch: str | None = tempfile.mkdtemp(prefix="aim-llama-migrate-")
        except OSError:  # no temporary directory to be had: where Aim would have run it
            scratch = None
        try:
            code = subprocess.run(make_cmd(), env=env, check=False, cwd=scratch).returncode
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if code != 0:
            raise subprocess.SubprocessError(f"Database upgrade failed with exit code {code}")

    upgrade_database._aim_llama = True  # type: ignore[attr-defined]
    db.upgrade_database = upgrade_database  # type: ignore[attr-defined]


def _has_version(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return bool(fh.read().strip())
    except OSError:
        return False


def _repo_still_there(run: Any) -> bool:
    """False once the local repo's `.aim` directory is gone (deleted while the run was open:
    Aim would go on writing into unlinked files and the records would vanish)."""
    try:
        path = run.repo.path
    except Exception:
        return True
    return not isinstance(path, str) or os.path.isdir(path)


def _address_of(repo: str | None) -> remote.Address | None:
    """The server address for an aim:// repo (None for a local one or a malformed address)."""
    if not remote.is_remote(repo):
        return None
    try:
        return remote.parse_address(str(repo))
    except ValueError:
        return None


class RunSink:
    """Owns one Aim `Run` and applies records to it, in order, from a single consumer."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.run: Any = None
        self.run_hash: str | None = None
        self.failed: str | None = None
        self.lost = 0  # records that could not be stored (run creation or tracking failed)
        self.stored = 0
        self.abort = False  # set by an exiting application: stop between records, count the rest
        self._steps: dict[tuple[str, Any], int] = {}
        self._fast: FastTrack | None = None
        self._finish = Finisher(ContentPolicy(max_length=config.max_text_length,
                                              patterns=tuple(config.redact_patterns)))
        self._lock = threading.RLock()
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._log_line = 0
        self._log_tail = ""
        self._in_key = 0  # lines into a private key printed line by line (0: outside one)
        self._aim: Any = None
        # aim:// repos: retry with backoff, hold records while the server is unreachable, and
        # count what the server confirmed (see `remote.add_marker`).
        self.address = _address_of(config.repo)
        self.delivered = 0  # records confirmed by the server (remote only)
        self.on_ack: Any = None  # acknowledge flush tokens once the server confirmed them
        self.exit_guard = True  # bound Aim's exit cleanup (off in the writer process: os._exit)
        self._backoff = remote.Backoff()
        self._held: collections.deque[Record] = collections.deque()
        self._held_records = 0
        self._marked = 0
        self._client: Any = None
        self._last_delivery = 0.0
        self._unreachable_since: float | None = None
        self._gave_up = False
        self._closed = threading.Event()
        self._exiting = threading.Event()  # the interpreter began to exit (`_bound_exit`)
        self._app_exit = threading.Event()  # ... set only by the exit itself

    # -- run lifecycle -------------------------------------------------------------------
    def _open(self) -> bool:
        if self.failed is not None:
            return False
        if self.run is not None:
            return True
        if self.address is not None and not self._backoff.due():
            return False
        try:
            if self.address is not None:
                reason = remote.tcp_check(self.address, CONNECT_TIMEOUT)
                if reason is not None:
                    raise ConnectionError(reason)
            with tolerant_atexit():
                import aim
                from aim import Run  # type: ignore[attr-defined]
            patch_aim_exit_cleanup()
            patch_aim_status_reporters()
            quiet_aim_cleanup()  # (and Aim's status reporter's failures: see the hook)
            patch_aim_migrations()  # (an old repo is upgraded when a Run opens it)

            self._aim = aim
            repo = resolve_repo(self.config.repo)
            ensure_repo_initialized(repo)
            if self.address is None:
                install_group_commit()
                size_memtables_in_this_thread()  # (the databases of this run, opened next)
            with tolerant_atexit():
                run = Run(
                    run_hash=self.config.run_hash,
                    repo=repo,
                    experiment=self.config.experiment,
                    system_tracking_interval=None,
                    log_system_params=False,
                    capture_terminal_logs=False,
                )
            if getattr(run, "_resources", None) is None and not hasattr(run, "hash"):
                raise RuntimeError("Aim returned an unusable Run")
        except Exception as exc:
            if self.address is not None and not at_shutdown(exc):
                self._connect_failed(exc)
                return False
            if self.address is not None:
                self.failed = f"{type(exc).__name__}: {exc}"
                log.error(
                    "cannot open a run on the Aim server %s while Python shuts down (Aim's "
                    "client needs threads, which Python 3.12 refuses to start then): this "
                    "process's records are lost and counted at exit; the default process writer "
                    "(AIM_LLAMA_WRITER=process) does not have this limit",
                    self.address.url,
                )
                self._lose_held()
                return False
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error(
                "cannot create the Aim run in repo %r (%s); recording is off for this process, "
                "the application continues",
                self.config.repo or os.path.abspath(".aim"),
                self.failed,
            )
            return False
        self.run = run
        self.run_hash = str(run.hash)
        if self.config.run_hash:
            self._resume_steps(run)
        self._set_params(run)
        if self.address is not None:
            servers_in_use.append(self.address)
            self._connected()
        else:
            self._fast = FastTrack.create(run)
        if self.config.system_tracking_interval:
            stats = threading.Thread(
                target=self._track_system_stats, name="aim-llama-sysstats", daemon=True
            )
            try:
                start_background(stats)
                self._stats_thread = stats
            except RuntimeError as exc:  # opened during interpreter shutdown: no system metrics
                if not at_shutdown(exc):
                    raise
        return True

    def _resume_steps(self, run: Any) -> None:
        """Continue every sequence of a run an earlier writer process stored into after its
        last step (a step written again would replace that earlier value)."""
        try:
            traces = run.meta_run_tree.subtree("traces").collect()
        except Exception as exc:
            log.warning("could not read the steps already stored in run %s (%s: %s); new "
                        "values may replace some of them", run.hash, type(exc).__name__, exc)
            return
        for ctx_idx, names in (traces or {}).items():
            try:
                key = context_key(run.idx_to_ctx(ctx_idx).to_dict())
            except Exception:
                continue
            for name, info in (names or {}).items():
                last = info.get("last_step") if isinstance(info, dict) else None
                if isinstance(last, int):
                    self._steps[(name, key)] = max(self._steps.get((name, key), 0), last + 1)
        line = self._steps.get(("logs", context_key(None)))
        if line:
            self._log_line = max(self._log_line, line)

    def _set_params(self, run: Any) -> None:
        """The run's parameters, each on its own: one Aim cannot store (an integer beyond 64
        bits, say) is left out with a warning instead of costing the process its run."""
        redact = self._finish.policy.redact_value
        params: list[tuple[str, Any]] = [("aim_llama", {
            "version": self.config.version,
            "pid": self.config.app_pid,
            "role": self.config.role,
            "writer": self.config.writer,
        })]
        if self.config.log_system_params:
            from .sysparams import system_params

            params.append(("__system_params", system_params(
                self.config.executable, self.config.argv, self.config.environment)))
        params.extend(self.config.run_params.items())  # (after ours: they keep their names)
        taken: set[str] = set()
        for key, value in params:
            # (a name may be a secret too; two redacted ones stay two)
            key = unique_name(self._finish.policy.redact_head(key, None), taken)
            taken.add(key)
            try:
                run.set(key, redact(value), strict=False)
            except Exception as exc:
                warn_once(f"run-param:{key}", "the run parameter %r cannot be stored in Aim "
                          "(%s: %s); it is left out", key, type(exc).__name__, exc)

    def close(self, timeout: float | None = None) -> bool:
        """Store what is pending and finalize the run (end time set, locks released).

        Local repos close inline. For an aim:// server the close runs in a helper thread and
        is abandoned after `timeout` (default: the flush timeout), because Aim's `close()`
        waits forever for a server that is gone; the records the server never confirmed are
        then counted in `lost`. Returns False when it had to give up.
        """
        self._stats_stop.set()
        if self._stats_thread is not None:
            self._stats_thread.join(timeout=5 if timeout is None else min(5.0, timeout))
        if self.address is None:
            self._finalize(None)
            return True
        limit = self.config.flush_timeout if timeout is None else timeout
        if self._gave_up:  # the exit deadline has passed already (Aim's cleanup ran first)
            limit = 0.0
        deadline = time.monotonic() + max(0.0, limit)
        helper = threading.Thread(
            target=self._finalize, args=(deadline,), name="aim-llama-close", daemon=True
        )
        try:
            start_background(helper)
        except RuntimeError:  # interpreter shutdown (Python >= 3.12): no new threads
            self._finalize(deadline)  # inline; the writer's caller bounds how long it waits
            return True
        helper.join(max(0.0, deadline - time.monotonic()))
        if helper.is_alive():
            self.give_up()
            return False
        return True

    def _finalize(self, deadline: float | None) -> None:
        with self._lock:
            if self.address is not None and self.run is None and self._held_records:
                self._last_chance(deadline)
            if self.run is None:
                if self._held_records and not self._gave_up:
                    self._report_lost(self._held_records, "it never became reachable")
                    self._lose_held()
                return
            try:
                try:
                    if self.failed is None:
                        if self._log_tail:
                            self._track_log_line(self._log_tail)
                            self._log_tail = ""
                        if self._fast is not None:
                            self._fast.flush()
                    self._mark([])
                except Exception as exc:
                    log.error("could not store the last records of Aim run %s: %s: %s",
                              self.run_hash, type(exc).__name__, exc)
                try:
                    self.run.close()
                except Exception as exc:
                    log.error("could not finalize Aim run %s: %s", self.run_hash, exc)
                if self._client is not None:
                    remote.disconnect(self._client)
                self.run = None
            finally:
                self._closed.set()
                self._exiting.set()  # (an idle `_exit_deadline` thread sees `_closed`)

    def _lose_held(self) -> None:
        """Count what is held for the server as lost and answer the flush requests among it,
        so no `flush()` waits for records that will never be delivered (lock held)."""
        held, self._held = self._held, collections.deque()
        self.lost += self._held_records
        self._held_records = 0
        for rec in held:
            if isinstance(rec, Flush) and self.on_ack is not None:
                self.on_ack(rec.token)

    def _bound_exit(self) -> None:
        """Interpreter exit in the application: Aim's cleanup (next) waits forever for a server
        that is gone; after the flush timeout, give up on what it still holds."""
        if self._client is not None:
            # Aim's cleanup (next) may fail on a dead server before we give up, also when the
            # run was finalized long ago (it still releases the client's resources)
            quiet_aim_cleanup()
        self._app_exit.set()
        if self.run is None:
            return
        self._exiting.set()  # starts the clock of `_exit_deadline`

    def _exit_deadline(self) -> None:
        """A daemon thread from the moment the server run opened, idle until exit begins (or
        the run is closed: `_finalize` sets `_exiting` too, and `_closed` ends it below)."""
        self._exiting.wait()
        # Keep about a second for what follows (Aim stops its heartbeat thread, our writer
        # closes), so the whole exit stays within the flush timeout.
        budget = max(0.2, self.config.flush_timeout - 1.0)
        if self._closed.wait(budget):
            # Finalized, everything delivered. Aim's exit cleanup still asks the server to
            # release what the run's client held; a server gone by then (after `uninstrument()`,
            # long before exit) must not hold the exit either.
            self._app_exit.wait()
            quiet_aim_cleanup()
            if not aim_cleanup_done(budget):
                release_aim_exit()
            return
        self.give_up()
        release_aim_exit()

    def _last_chance(self, deadline: float | None) -> None:
        """Closing with records held for an unreachable server: keep trying until the deadline."""
        while self.failed is None:
            self._backoff.next_at = 0.0
            if self._open():
                self._apply_held([])
                return
            left = (deadline or 0.0) - time.monotonic()
            if left <= 0.3:  # leave `close` time to see this end (and say why) before its deadline
                return
            time.sleep(min(0.5, left - 0.25))

    def give_up(self, received: int | None = None) -> None:
        """The deadline passed: count what the server never confirmed and release Aim's waiters.

        `received`: records the writer was handed in all (some may not have reached this sink).
        """
        if self._gave_up:
            return
        # A close that is just ending reports what it lost itself: wait a moment for it (but
        # never for a sink stuck inside Aim with the lock held: a hung server).
        locked = self._lock.acquire(timeout=0.25)
        try:
            self._give_up(received)
        finally:
            if locked:
                self._lock.release()

    def _give_up(self, received: int | None) -> None:
        if self._gave_up:
            return
        missing = self.unconfirmed()
        if received is not None:
            # (those it counted lost already, a buffer bound's drops, are not lost twice)
            missing = max(missing, received - self.confirmed - self.lost)
        self.lost += missing
        self._gave_up = True  # counted once, as lost; nothing is unconfirmed any more
        server_abandoned.append(True)
        if self._client is not None:
            remote.abandon_queue(self._client)
        self._report_lost(
            missing,
            f"the flush timeout ({self.config.flush_timeout:g}s, AIM_LLAMA_FLUSH_TIMEOUT) ran out",
        )

    def _report_lost(self, count: int, why: str) -> None:
        if count:
            log.error(
                "%d records were not delivered to the Aim server %s because %s; they are lost",
                count,
                self.address.url if self.address else self.config.repo,
                why,
            )

    # -- remote servers ------------------------------------------------------------------
    @property
    def confirmed(self) -> int:
        """Records known to be in the repo: stored (local) or confirmed by the server (remote)."""
        return self.delivered if self.address is not None else self.stored

    def unconfirmed(self) -> int:
        """Records accepted but not (yet) confirmed by the server: held plus in Aim's queue."""
        if self.address is None or self._gave_up:
            return 0
        return self._held_records + max(0, self.stored - self.delivered)

    def _connect_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        delay = self._backoff.failed(now)
        if self._unreachable_since is None:
            self._unreachable_since = now
        assert self.address is not None
        if isinstance(exc, ValueError):  # (JSONDecodeError) something answered, not Aim
            problem = ("answers, but not as an Aim tracking server (%s: is it `aim up`, or "
                       "another service, on that port?)")
        else:
            problem = "is not reachable (%s)"
        warn_once(
            "remote-unreachable",
            "the Aim server %s " + problem + "; the application continues, up to %d "
            "records are kept in memory and sent when it answers (retrying with backoff)",
            self.address.url,
            remote.describe_failure(exc),
            self.config.buffer_size,
        )
        log.debug("next attempt to reach %s in %.1fs", self.address.url, delay)

    def _connected(self) -> None:
        self._client = remote.client_of(self.run)
        self._last_delivery = time.monotonic()
        if self.exit_guard:  # a writer thread inside the application (no writer process)
            with contextlib.suppress(Exception):
                # Started now: Python 3.12 starts no thread once the interpreter is exiting.
                start_background(threading.Thread(
                    target=self._exit_deadline, name="aim-llama-exit-deadline", daemon=True))
            with contextlib.suppress(Exception):
                atexit.register(self._bound_exit)  # runs before Aim's own exit cleanup (LIFO)
        if self._unreachable_since is not None:
            log.info(
                "connected to the Aim server %s after %.1fs; sending %d held records",
                self.address.url if self.address else "",
                time.monotonic() - self._unreachable_since,
                self._held_records,
            )
            self._unreachable_since = None

    def _hold(self, rec: Record) -> None:
        """Keep a record while the server is unreachable, within the buffer bound."""
        if isinstance(rec, Flush):
            self._held.append(rec)
            return
        if self.unconfirmed() >= self.config.buffer_size:
            self._drop_unconfirmed()
            return
        self._held.append(rec)
        self._held_records += 1

    def _await_server(self) -> bool:
        """At the buffer bound with a server that is answering: wait (this is the writer, not
        the application) up to `SERVER_PATIENCE` for it to confirm what it has, instead of
        dropping records a healthy server is simply still taking. True once there is room;
        False at once for a server that has confirmed nothing for that long (lock held)."""
        if time.monotonic() - self._last_delivery > SERVER_PATIENCE or self.abort:
            return False
        self._mark([])
        deadline = time.monotonic() + SERVER_PATIENCE
        room = max(1, self.config.buffer_size * 3 // 4)
        while self.unconfirmed() >= room:
            if time.monotonic() >= deadline or self.abort or self._gave_up:
                return self.unconfirmed() < self.config.buffer_size
            time.sleep(0.005)
        return True

    def _drop_unconfirmed(self) -> None:
        self.lost += 1
        warn_once(
            "remote-buffer-full",
            "%d records are waiting for the Aim server %s to confirm them (the buffer bound, "
            "setting queue_size, AIM_LLAMA_QUEUE_SIZE) and it has not confirmed any for a "
            "while; newer records are dropped and counted until it catches up",
            self.config.buffer_size,
            self.address.url if self.address else "",
        )

    def _apply_held(self, tokens: list[int]) -> None:
        """Replay what was held, in order, now that the run exists."""
        while self._held:
            rec = self._held.popleft()
            if isinstance(rec, Flush):
                self._flush_token(rec.token, tokens)
                continue
            self._held_records -= 1
            self._store(rec)

    def _flush_token(self, token: int, tokens: list[int]) -> None:
        if self.address is not None and self.on_ack is not None:
            self._mark([token])
        else:
            tokens.append(token)

    def _mark(self, tokens: list[int]) -> None:
        """Queue a marker on Aim's client: when it runs, the server has what preceded it."""
        client = self._client
        if client is None or self.address is None:
            return
        count = self.stored - self._marked
        if not count and not tokens:
            return
        if self._marked == self.delivered:
            self._last_delivery = time.monotonic()  # the backlog starts now, not at the last delivery
        self._marked = self.stored
        on_ack = self.on_ack

        def delivered() -> None:
            self.delivered += count
            self._last_delivery = time.monotonic()
            if on_ack is not None:
                for token in tokens:
                    on_ack(token)

        if not remote.add_marker(client, delivered):
            delivered()  # Aim's internals changed: fall back to "handed over"

    def poll(self) -> list[int]:
        """Idle-time work for aim:// repos: retry a due connection, notice a silent server."""
        tokens: list[int] = []
        if self.address is None:
            return tokens
        with self._lock:
            if self.run is None:
                if self._held_records and self._open():
                    self._apply_held(tokens)
                    self._mark([])
                return tokens
            waiting = self.stored - self.delivered
            if waiting and time.monotonic() - self._last_delivery > STALL_WARNING:
                warn_once(
                    "remote-stalled",  # its own key: a server down at start may die later too
                    "the Aim server %s has not confirmed %d records for %.0fs; they are kept "
                    "in memory (up to %d) and sent when it answers",
                    self.address.url,
                    waiting,
                    STALL_WARNING,
                    self.config.buffer_size,
                )
        return tokens

    # -- applying records ----------------------------------------------------------------
    def apply(self, records: Iterable[Record]) -> list[int]:
        """Store records in order; return the flush tokens seen (each acknowledges what preceded it).

        For an aim:// server with `on_ack` set, tokens are acknowledged through `on_ack` once
        the server confirmed everything before them, instead of being returned.
        """
        tokens: list[int] = []
        stored_before = self.stored
        unreadable = getattr(records, "unreadable", 0)
        if unreadable:  # chunks the writer could not unpickle: counted, said once
            self.lost += unreadable
            warn_once("unreadable", "%d records from the application could not be read by the "
                      "Aim writer (%s); they are lost (later ones are counted in the exit report)",
                      unreadable, getattr(records, "why", ""), level=logging.ERROR)
        try:
            self._apply(records, tokens)
        except Exception as exc:  # the repo refused a write (a full disk, a deleted directory …)
            with self._lock:
                self._unwritable(exc, self.stored - stored_before)
        return tokens

    def _unwritable(self, exc: BaseException, batch: int) -> None:
        """The repo stopped taking writes: this batch and everything after it is lost, counted,
        and said once (lock held)."""
        self.stored -= batch
        self.lost += batch
        if self.failed is None:
            quiet_aim_cleanup(everything=True)  # Aim's exit clean-up fails on it too: said here
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error(
                "cannot write to the Aim repo %r any more (%s); %d records of this batch and "
                "every later one are counted as lost, the application continues",
                self.config.repo or os.path.abspath(".aim"), self.failed, batch,
            )

    def _apply(self, records: Iterable[Record], tokens: list[int]) -> None:
        # Group commit batches local RocksDB writes; an aim:// run has none (and importing Aim
        # for it would delay reporting an unreachable server).
        if self.address is None and self.run is not None and self.failed is None and (
                not _repo_still_there(self.run)):
            with self._lock:
                self._unwritable(FileNotFoundError("its directory was removed"), 0)
        batching = group_commit() if self.address is None else contextlib.nullcontext()
        with self._lock, batching:
            for rec in records:
                if self.abort and not isinstance(rec, Flush):
                    self.lost += 1  # the application is exiting: count instead of storing
                    continue
                if self.address is not None and self.run is None:
                    if not self._open():
                        if self.failed is None:
                            self._hold(rec)
                        elif not isinstance(rec, Flush):
                            self.lost += 1
                        elif self.on_ack is not None:
                            self.on_ack(rec.token)  # nothing before it will ever be delivered
                        else:
                            tokens.append(rec.token)
                        continue
                    self._apply_held(tokens)
                if isinstance(rec, Flush):
                    self._flush_token(rec.token, tokens)
                    continue
                if not self._open():
                    self.lost += 1
                    continue
                if (self.address is not None and self.unconfirmed() >= self.config.buffer_size
                        and not self._await_server()):
                    self._drop_unconfirmed()
                    continue
                self._store(rec)
            if self._fast is not None:
                self._fast.flush()
            self._mark([])

    def _store(self, rec: Record) -> None:
        try:
            self._apply_one(rec)
            self.stored += 1
        except Exception as exc:
            self.lost += 1
            kind = f"{type(rec).__name__} {getattr(rec, 'name', '')}".rstrip()
            warn_once(f"store {kind} {type(exc).__name__}",
                      "could not store %s in Aim: %s: %s (further failures like it are counted "
                      "in the exit report, not printed)", kind, type(exc).__name__, exc,
                      level=logging.ERROR)

    def _next_step(self, name: str, ctx_key: Any, step: int | None) -> int:
        key = (name, ctx_key)
        if step is None:
            step = self._steps.get(key, 0)
        self._steps[key] = max(self._steps.get(key, 0), step + 1)
        return step

    def _apply_one(self, rec: Record) -> None:
        run = self.run
        rec = self._finish(rec)
        if isinstance(rec, Track):
            value = rec.value
            if rec.kind == "text":
                value = self._aim.Text(str(value))
            elif rec.kind == "token_estimate":
                from .tokens import count_in_writer

                value = count_in_writer(value)
            elif rec.kind == "distribution":
                value = self._distribution(list(value))
            ctx_key = context_key(rec.context)
            step = self._next_step(rec.name, ctx_key, rec.step)
            fast = self._fast
            if fast is not None and fast.run is run:
                fast.track(value, rec.name, step, rec.context or {}, ctx_key)
            else:
                run.track(value, name=rec.name, step=step, context=rec.context or {})
        elif isinstance(rec, Param):
            run.set(rec.key, rec.value, strict=False)
        elif isinstance(rec, LogError):
            run.log_error(rec.message, **rec.details)
        elif isinstance(rec, TerminalOutput):
            self._terminal(rec.text)

    def _distribution(self, samples: list[float]) -> Any:
        """Aim's 64-bin histogram of `samples`; one bin holding them all where their range is
        too narrow or too wide for 64 finite bins (near-duplicate chunks score equal but for
        the last bits: numpy refuses those, and the record was lost with an error line)."""
        try:
            return self._aim.Distribution(samples=samples)
        except ValueError:
            low, high = float(min(samples)), float(max(samples))
            value = self._aim.Distribution(hist=[len(samples)], bin_range=(0.0, 1.0))
            value.storage["range"] = [low, high]  # (numpy's linspace overflows on ±1e308)
            return value

    def _terminal(self, text: str) -> None:
        data = self._log_tail + text
        lines = data.split("\n")
        self._log_tail = lines.pop()
        for line in lines:
            self._track_log_line(line)

    def _track_log_line(self, line: str) -> None:
        from aim.ext.resource.log import LogLine

        line = line.rstrip("\r").rsplit("\r", 1)[-1]  # (CRLF: the line, not "")
        policy = self._finish.policy
        if self._in_key:  # the body of a private key printed over several lines
            end = _KEY_END.search(line)
            if end is not None:
                self._in_key = 0
                line = REDACTED + line[end.end():]
            elif _KEY_BODY.fullmatch(line) and self._in_key <= _KEY_LINES:
                self._in_key += 1
                line = REDACTED
            else:  # not a key's body after all (a truncated key, text about one)
                self._in_key = 0
        if not self._in_key and policy.patterns[:1] == DEFAULT_SECRET_PATTERNS[:1]:
            # (redacted line by line: a line that ends with a key's first line goes on)
            begins = list(_KEY_BEGIN.finditer(line)) if "PRIVATE KEY" in line else []
            if begins and not line[begins[-1].end():].strip():
                self._in_key = 1
        line = storable(policy.redact(line))
        self.run.track(LogLine(line), name="logs", step=self._log_line)
        self._log_line += 1

    # -- system metrics of the application process -----------------------------------------
    def _track_system_stats(self) -> None:
        interval = float(self.config.system_tracking_interval or 1)
        try:
            import psutil
            from aim.ext.resource.stat import Stat

            proc = psutil.Process(self.config.app_pid or os.getpid())
            proc.cpu_percent(None)
        except Exception as exc:
            if type(exc).__name__ == "NoSuchProcess":
                return  # the application ended before its first sample: nothing to measure

            log.warning("system metrics are off: %s", exc)
            return
        step = 0
        while True:
            try:
                stat = Stat(proc)
            except Exception:  # the application has exited
                return
            with self._lock:
                if self.run is None:
                    return
                for resource, usage in stat.system.items():
                    try:
                        self.run.track(usage, name=f"__system__{resource}", step=step)
                    except Exception:
                        return
            step += 1
            if self._stats_stop.wait(interval):
                return


def track_dropped(total: int) -> Track:
    """The record that tells the run how many records the application had to drop so far."""
    return Track(DROPPED_METRIC, total, "metric", {"kind": "queue"})


def now_ms() -> float:
    """Monotonic milliseconds, for latency."""
    return time.perf_counter() * 1000.0
