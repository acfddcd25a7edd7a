"""Talking to an Aim remote tracking server (`aim://host:port`) without ever hanging.

Aim 3.29's client fails at `Run` creation when the server is down, queues writes in memory
forever when it dies mid-run, and blocks `close()` (and interpreter exit) until the server is
back. These helpers let the writer check reachability cheaply, retry with backoff, learn which
records the server actually confirmed, and give up on Aim's queue at a deadline.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple

DEFAULT_PORT = 53800


class Address(NamedTuple):
    """Host and port of an Aim server, parsed from `aim://host:port`."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The address as users write it (`aim://host:port`)."""
        return f"aim://{self.host}:{self.port}"


def is_remote(repo: str | None) -> bool:
    """True when the repo setting names an Aim server rather than a directory."""
    return bool(repo) and str(repo).startswith("aim://")


def parse_address(repo: str) -> Address:
    """`aim://host:port` → Address (port defaults to Aim's 53800); ValueError if malformed."""
    if not repo.startswith("aim://"):
        raise ValueError(f"{repo!r} is not an aim:// address")
    rest = repo[len("aim://") :].rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = rest, str(DEFAULT_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{repo!r} is not an aim://host:port address")
    return Address(host, int(port_text))


def tcp_check(address: Address, timeout: float = 2.0) -> str | None:
    """None when a TCP connection to the server opens within `timeout`, else the reason."""
    try:
        with socket.create_connection((address.host, address.port), timeout=max(0.05, timeout)):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve host {address.host!r} ({exc.strerror or exc})"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, socket.timeout):
            reason = f"no answer within {timeout:g}s"
        return reason


def http_json(address: Address, path: str, timeout: float = 3.0) -> Any:
    """GET `http://host:port{path}` and decode JSON; raises on any failure."""
    url = f"http://{address.host}:{address.port}{path}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def server_version(address: Address, timeout: float = 3.0) -> str:
    """The Aim version reported by the tracking server (its `/client/get-version/` endpoint)."""
    data = http_json(address, "/client/get-version/", timeout)
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        raise ValueError(f"unexpected answer {data!r}")
    return str(data["version"])


class Backoff:
    """Exponential backoff with jitter, so many processes do not retry in lock step."""

    def __init__(self, first: float = 0.5, factor: float = 2.0, cap: float = 5.0) -> None:
        self.first = first
        self.factor = factor
        self.cap = cap
        self.delay = first
        self.next_at = 0.0
        self.attempts = 0

    def due(self, now: float | None = None) -> bool:
        """Whether the next attempt may run now."""
        return (time.monotonic() if now is None else now) >= self.next_at

    def failed(self, now: float | None = None) -> float:
        """Record a failed attempt; returns the delay until the next one."""
        self.attempts += 1
        delay = self.delay * random.uniform(0.8, 1.2)
        self.next_at = (time.monotonic() if now is None else now) + delay
        self.delay = min(self.cap, self.delay * self.factor)
        return delay


def client_of(run: Any) -> Any:
    """The Aim transport client behind a remote Run, or None for a local one."""
    repo = getattr(run, "repo", None)
    return getattr(repo, "_client", None)


def add_marker(client: Any, callback: Callable[[], None]) -> bool:
    """Queue `callback` behind every write already queued on Aim's client.

    Aim's request queue runs its tasks in order and only moves past a write once the server
    acknowledged it (failed writes are put back in front and retried), so when the callback
    runs, everything queued before it has been confirmed by the server.
    """
    try:
        queue = client.get_queue()

        def marker(_instructions: Any) -> None:
            callback()

        queue.register_task(client, marker, [])
        return True
    except Exception:
        return False


def abandon_queue(client: Any) -> None:
    """Give up on Aim's pending writes so nothing waits for a server that is gone.

    Empties the client's request queue and marks it finished and stopped: Aim's `close()`
    and its exit-time cleanup (both wait for that queue) then return instead of blocking
    forever. Used only after the flush deadline, when the records are counted as lost.
    """
    try:
        queue = client.get_queue()
        queue._shutdown = True
        inner = queue._queue
        with inner.mutex:
            inner.queue.clear()
            inner.unfinished_tasks = 0
            inner.all_tasks_done.notify_all()
            inner.not_full.notify_all()
        queue.current_memory_usage = 0
    except Exception:
        pass
    heartbeat = getattr(client, "_heartbeat_sender", None)
    if heartbeat is not None:
        heartbeat._shutdown = True


def disconnect(client: Any) -> None:
    """Stop Aim's client threads and tell the server goodbye (bounded by Aim's 10 s HTTP timeout)."""
    try:
        client._heartbeat_sender.stop()
        client.get_queue().stop()
        client.disconnect()
    except Exception:
        pass


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed connection attempt (Aim's messages are long)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
    return text[:200]
