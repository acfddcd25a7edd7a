"""Shared fixtures: run a real LlamaIndex program in a subprocess, then read its Aim repo back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from aimread import RunData, read_all, run_hashes

APPS = Path(__file__).parent / "apps"
ROOT = Path(__file__).resolve().parent.parent

# Variables a developer's shell may carry that would change what a test means.
_CLEAN = [
    k for k in os.environ if k.startswith(("AIM_", "AIM_LLAMA_", "__AIM")) or k == "PYTHONSTARTUP"
]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus any AIM_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("AIM_SYSTEM_TRACKING_INTERVAL", "off")
    env.update(extra)
    return env


def unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` run so that file permissions bind it: as root, without the capabilities that
    override them (`setpriv`); skips the test where that cannot be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to bind")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory (no pyproject.toml or aim_llama.toml of ours in sight)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """An initialized, empty Aim repo (a copy of the session's template: making one costs each
    test ~2 s of Aim's migrations). Tests marked `new_repo` get a path that does not exist yet,
    as a user's first run does, and see aim-llama create the repo."""
    path = tmp_path / "aimrepo"
    if request.node.get_closest_marker("new_repo") is None:
        shutil.copytree(request.getfixturevalue("template_repo"), path)
    return path


INIT_REPO = (
    "import sys\nfrom aim_llama.aimexit import patch_aim_exit_cleanup\nfrom aim import Repo\n"
    "patch_aim_exit_cleanup()\nRepo.from_path(sys.argv[1], init=True)\n"
)


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized, empty Aim repo, made once per session and only ever copied: creating one
    costs ~2-3 s (Aim's import and migrations).

    Made through aim-llama's exit-cleanup patch: on Python 3.12 Aim's own atexit cleanup fails
    and would leave the template's files unclosed.
    """
    path = tmp_path_factory.mktemp("template") / "aimrepo"
    subprocess.run([sys.executable, "-c", INIT_REPO, str(path)], check=True, env=clean_env(),
                   timeout=120)
    return path


RunPy = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_py(workdir: Path, repo: Path) -> RunPy:
    """Run Python code (a string) or an app script in a subprocess with AIM_REPO set to `repo`."""

    def _run(
        code: str | None = None,
        *,
        script: str | Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
        use_repo: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        extra = {"AIM_REPO": str(repo)} if use_repo else {}
        extra.update(env or {})
        cmd = [sys.executable]
        if code is not None:
            cmd += ["-c", textwrap.dedent(code)]
        else:
            cmd += [str(script)]
        cmd += args or []
        proc = subprocess.run(
            cmd, cwd=workdir, env=clean_env(**extra), capture_output=True, text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    return _run


@pytest.fixture
def read_runs(repo: Path) -> Callable[..., list[RunData]]:
    """Read every run of `repo` back as Aim's UI would (indexing first)."""

    def _read(with_texts: bool = True) -> list[RunData]:
        return read_all(repo, with_texts)

    return _read


def only_run(repo: Path) -> RunData:
    """The single run in `repo` (fails if there is not exactly one)."""
    hashes = run_hashes(repo)
    assert len(hashes) == 1, f"expected one run, found {hashes}"
    return read_all(repo)[0]
