"""Fixtures that run real Aim processes on free loopback ports: `aim server` and `aim up`.

Each process is started in its own session so that stopping it (SIGTERM, then SIGKILL) also
stops the uvicorn child it spawns; every process a test started is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import clean_env

AIM = str(Path(sys.executable).with_name("aim"))
HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except Exception:
        return False


class AimProcess:
    """One `aim server` (tracking server) or `aim up` (UI backend) over `repo` on `port`."""

    def __init__(self, kind: str, repo: Path, port: int, log: Path) -> None:
        assert kind in ("server", "up")
        self.kind = kind
        self.repo = repo
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`aim://127.0.0.1:port` (what AIM_REPO takes)."""
        return f"aim://{HOST}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _probe(self) -> str:
        return f"{self.http}/client/get-version/" if self.kind == "server" else f"{self.http}/api/projects/"

    def start(self, timeout: float = 60) -> AimProcess:
        """Start and wait until it answers HTTP; fail with its log if it does not."""
        self.repo.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [AIM, self.kind, "--repo", str(self.repo), "--port", str(self.port),
                 "--host", HOST, "-y"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if http_ok(self._probe(), timeout=1.0):
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"aim {self.kind} did not come up:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL the process group: the server vanishes without a goodbye."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the process group: the server still holds its connections but never answers
        (a hung server, or a network partition that leaves connections open)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it is still there after 5 s."""
        if getattr(self, "paused", False) and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped process waits for SIGTERM
            self.paused = False
        self._signal(signal.SIGTERM, grace=5.0)

    def _signal(self, signum: int, grace: float = 0.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace or 10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        # The uvicorn child shares the group; wait until the port is free again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(self.port):
            time.sleep(0.05)
        self.proc = None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


AimFactory = Callable[..., AimProcess]


@pytest.fixture
def aim_process(tmp_path: Path) -> Iterator[AimFactory]:
    """Factory: `aim_process("server" | "up", repo=..., port=..., start=True)`; all stopped at teardown."""
    started: list[AimProcess] = []

    def make(kind: str = "server", repo: Path | None = None, port: int | None = None,
             start: bool = True) -> AimProcess:
        repo = repo or tmp_path / f"{kind}-repo"
        port = port or free_port()
        proc = AimProcess(kind, repo, port, tmp_path / f"aim-{kind}-{port}.log")
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.stop()
