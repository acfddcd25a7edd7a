"""The run's `__system_params`, recorded without `pkg_resources`.

Aim 3.29 computes these with `pkg_resources`, which setuptools >= 82 no longer ships, so its
own `log_system_params=True` crashes on a fresh virtualenv. We gather the same keys with
`importlib.metadata` and mask secret-looking environment variables the way Aim does.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_MARKERS = ("secret", "key", "token", "password", "passwd", "credential", "auth", "_pwd",
                  "_pass", "dsn", "private", "connection_string", "conn_str")
# `scheme://user:password@` in any value (DATABASE_URL, a proxy, an argument): the userinfo goes
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")  # (to the last @)


def installed_packages() -> dict[str, str]:
    """Installed distributions, name (lower case) -> version."""
    packages: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:
            continue
        if name:
            packages[str(name).lower()] = str(dist.version)
    return dict(sorted(packages.items()))


def environment_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables, minus any whose name looks like it holds a secret, the text of a
    piped config (`AIM_LLAMA_CONFIG_TEXT`: a config given through a pipe is often secret) and
    the redaction patterns (they show what the secrets look like); the user:password part of
    URLs in the values is dropped."""
    from .switches import CONFIG_TEXT_ENV

    env = os.environ if environ is None else environ
    return {
        k: without_userinfo(v) for k, v in env.items()
        if k not in (CONFIG_TEXT_ENV, "AIM_LLAMA_REDACT")
        and not any(m in k.lower() for m in SECRET_MARKERS)
    }


def without_userinfo(text: str) -> str:
    """`text` with the `user:password@` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text) if "@" in text else text


def _git(*args: str, cwd: str | None) -> str | None:
    try:
        out = subprocess.run(
            ("git", *args), cwd=cwd, capture_output=True, encoding="utf-8", errors="replace",
            timeout=2, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _without_credentials(url: str | None) -> str | None:
    """A remote URL without a user:password (or token) part: `https://tok@host/x` → `https://host/x`."""
    return None if url is None else without_userinfo(url)


def git_info(cwd: str | None = None) -> dict[str, Any]:
    """Branch, remote and last commit of the working directory's git checkout (empty if none)."""
    if _git("rev-parse", "--is-inside-work-tree", cwd=cwd) != "true":
        return {}
    commit = _git("log", "--pretty=format:%h/%ad/%an", "--date=iso-strict", "-1", cwd=cwd)
    parts = commit.split("/", 2) if commit else []
    return {
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD", cwd=cwd),
        "remote_origin_url": _without_credentials(
            _git("config", "--get", "remote.origin.url", cwd=cwd)),
        "commit": {
            "hash": parts[0] if len(parts) == 3 else None,
            "timestamp": parts[1] if len(parts) == 3 else None,
            "author": parts[2] if len(parts) == 3 else None,
        },
    }


def system_params(executable: str | None = None, argv: Sequence[str] | None = None,
                  environment: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The same `__system_params` dict Aim records, for the application process
    (`environment`: the application's, from `environment_variables()` there)."""
    return {
        "packages": installed_packages(),
        "env_variables": environment_variables(environment),
        "git_info": git_info(),
        "executable": executable or sys.executable,
        "arguments": [without_userinfo(str(a)) for a in (sys.argv if argv is None else argv)],
    }
