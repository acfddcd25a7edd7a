"""`aim-llama doctor` against real targets: a live `aim server`, a dead port, a web server that is
not Aim, local repos that are fine or unusable, and invalid configuration."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimread import read_run, run_hashes
from aimserver import free_port
from conftest import clean_env

pytest_plugins = ("aimserver",)  # the aim_process fixture


def doctor(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aim_llama", "doctor", "--timeout", "10", *args], cwd=workdir,
        env=clean_env(**env), capture_output=True, text=True, timeout=120,
    )


def lines(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """check name -> its whole line (a check's further lines, its warnings, joined by \n)."""
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        status, name = line.split()[:2]
        assert status in ("ok", "warn", "FAIL"), line
        out[name] = f"{out[name]}\n{line}" if name in out else line
    return out


def test_live_server_passes_every_check_and_the_probe_is_read_back(aim_process, workdir):
    server = aim_process("server")
    proc = doctor(workdir, "--probe", AIM_REPO=server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc)
    assert list(got) == ["config", "reachable", "protocol", "version", "probe"]
    assert all(line.startswith("ok") for line in got.values())
    from importlib.metadata import version

    assert f"Aim {version('aim')}" in got["version"]
    assert "read it back and removed it" in got["probe"]
    assert "Traceback" not in proc.stderr
    kept = doctor(workdir, "--probe", "--keep-probe", AIM_REPO=server.url)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    probe_line = lines(kept)["probe"]
    assert "read it back and kept it" in probe_line
    run_hash = probe_line.split("wrote run ", 1)[1].split()[0]
    server.stop()
    # What the server stored, read from its repo on disk: only the kept probe run, whole.
    assert run_hashes(server.repo) == [run_hash]  # the first probe cleaned up after itself
    run = read_run(server.repo, run_hash)
    assert [v for _, v in run.metric("doctor_probe", kind="doctor")] == [42.0]
    assert [t for _, t in run.text("doctor_probe_text", kind="doctor")] == [
        "hello from aim-llama doctor"]
    assert len(run.params["aim_llama_probe"]["token"]) == 32


def test_server_down_fails_with_a_fix_naming_aim_server(workdir):
    port = free_port()
    proc = doctor(workdir, "--probe", AIM_REPO=f"aim://127.0.0.1:{port}")
    assert proc.returncode == 1
    got = lines(proc)
    assert got["config"].startswith("ok")
    assert got["reachable"].startswith("FAIL")
    assert f"aim://127.0.0.1:{port}" in got["reachable"]
    assert f"fix: start the server (aim server --repo DIR --host 0.0.0.0 --port {port})" in got[
        "reachable"]
    assert got["probe"].startswith("FAIL") and "skipped" in got["probe"]
    assert proc.stderr.strip().splitlines()[-1] == f"1 of {len(got)} checks passed", proc.stderr


@pytest.fixture
def not_aim() -> Iterator[int]:
    """A plain HTTP server on a loopback port: something answers, but it is not Aim."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_a_port_that_is_not_an_aim_server_fails_the_protocol_check(workdir, not_aim):
    proc = doctor(workdir, AIM_REPO=f"aim://127.0.0.1:{not_aim}")
    assert proc.returncode == 1
    got = lines(proc)
    assert got["reachable"].startswith("ok")
    assert got["protocol"].startswith("FAIL")
    assert "not `aim up`" in got["protocol"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AIM_LLAMA_FLUSH_TIMEOUT": "abc"}, "AIM_LLAMA_FLUSH_TIMEOUT='abc'"),
        ({"AIM_REPO": "aim://no-port-here"}, "aim://host:port"),
        ({"AIM_SYSTEM_TRACKING_INTERVAL": "-3"}, "AIM_SYSTEM_TRACKING_INTERVAL"),
        ({"AIM_LLAMA_CONFIG": "bad.toml"}, "bad.toml is not valid TOML"),
    ],
)
def test_invalid_configuration_fails_the_config_check(workdir, env, expected):
    (workdir / "bad.toml").write_text("queue_size = \n")
    proc = doctor(workdir, **env)
    assert proc.returncode == 1
    got = lines(proc)
    assert list(got) == ["config"]
    assert got["config"].startswith("FAIL") and expected in got["config"]
    # the error's own "allowed:" or "fix the syntax" is the fix: said once, not twice
    assert "; fix:" not in got["config"] and got["config"].count("fix") <= 1, got["config"]


@pytest.mark.new_repo
def test_local_repo_probe_writes_reads_back_and_cleans_up(workdir, repo):
    proc = doctor(workdir, "--probe", AIM_REPO=str(repo))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc)
    assert list(got) == ["config", "repo", "probe"]
    assert proc.stderr.strip().splitlines()[-1] == "3 of 3 checks passed", proc.stderr
    assert "will be created" in got["repo"]
    assert "read it back and removed it" in got["probe"]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert (repo / ".aim").is_dir() and run_hashes(repo) == []
    again = lines(doctor(workdir, AIM_REPO=str(repo)))
    assert "exists and is writable" in again["repo"]


def test_unusable_local_repo_fails_with_a_fix(workdir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = doctor(workdir, "--probe", AIM_REPO=str(blocker / "repo"))
    assert proc.returncode == 1
    got = lines(proc)
    # a file on the repo's way can never work: the configuration itself is invalid
    assert got["config"].startswith("FAIL") and "on its way is a file" in got["config"]
    assert "env AIM_REPO=" in got["config"] and "allowed: a directory path" in got["config"]
    # a repo directory Aim cannot use (its `.aim` a file): the repo check says so, with a fix
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".aim").write_text("not Aim's directory")
    proc = doctor(workdir, "--probe", AIM_REPO=str(repo))
    assert proc.returncode == 1
    got = lines(proc)
    assert got["repo"].startswith("FAIL") and "fix:" in got["repo"], got
    assert got["probe"].startswith("FAIL")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_repo_that_cannot_be_created_fails_even_where_permissions_say_yes(workdir):
    """/proc lets root write by its mode bits, yet nothing can be made there: doctor tries."""
    proc = doctor(workdir, AIM_REPO="/proc/aim-llama-doctor-test/repo")
    assert proc.returncode == 1
    got = lines(proc)
    assert got["repo"].startswith("FAIL") and "cannot create" in got["repo"]
    assert "fix:" in got["repo"]


def test_the_kill_switch_is_said_and_the_settings_are_still_checked(workdir):
    """The app runs disabled and says nothing: doctor says why nothing is recorded, and still
    checks the settings, as `aim-llama config` does (a pre-flight for switching it on)."""
    proc = doctor(workdir, AIM_LLAMA_ENABLED="false", AIM_LLAMA_QUEUE_SIZE="5")
    assert proc.returncode == 1, proc.stdout
    config = lines(proc)["config"].splitlines()
    assert len(config) == 2 and config[0].startswith("FAIL  config") and "queue_size" in config[0]
    assert config[1].startswith("warn  config    recording is off: enabled = false (env "
                                "AIM_LLAMA_ENABLED)"), config
    (workdir / "aim_llama.toml").write_text("enabled = false\n")
    proc = doctor(workdir)
    assert proc.returncode == 0, proc.stdout
    got = lines(proc)
    config = got["config"].splitlines()
    assert len(config) == 2 and config[0].startswith("ok    config    valid"), config
    assert f"enabled = false ({workdir / 'aim_llama.toml'}: enabled)" in config[1], config
    assert got["repo"].startswith("ok"), got  # (checked as for the day it is switched on)


@pytest.mark.parametrize(("args", "said"), [
    (("--keep-probe",), "--keep-probe keeps the run of --probe: add --probe"),
    (("--timeout", "0.09"), "'0.09' is not a number of seconds from 0.1 to 86400"),
    (("--timeout", "86400.5"), "'86400.5' is not a number of seconds from 0.1 to 86400"),
    (("--timeout", "nan"), "'nan' is not a number of seconds from 0.1 to 86400"),
    (("--timeout", "soon"), "'soon' is not a number of seconds from 0.1 to 86400"),
])
def test_a_usage_error_exits_2_with_one_line_and_checks_nothing(workdir, args, said):
    """A mistyped command line is not a failed check: exit 2 (as argparse's own errors), one
    line saying what is allowed, and nothing probed or created."""
    proc = subprocess.run(
        [sys.executable, "-m", "aim_llama", "doctor", *args], cwd=workdir,
        env=clean_env(AIM_REPO=str(workdir / "repo")), capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("aim-llama")
    assert not (workdir / "repo").exists()


@pytest.mark.parametrize("seconds", ["0.1", "86400"])
def test_the_timeout_bounds_are_inclusive(workdir, seconds):
    proc = subprocess.run(
        [sys.executable, "-m", "aim_llama", "doctor", "--timeout", seconds], cwd=workdir,
        env=clean_env(AIM_REPO=str(workdir / "repo")), capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "2 of 2 checks passed"
