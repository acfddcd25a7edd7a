"""`aim-llama config`: effective settings with sources; exit 1 with the one-line error when invalid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aim_llama.cli import main
from aim_llama.settings import FIELDS
from conftest import ROOT, clean_env, unprivileged


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aim_llama", *args], cwd=cwd, env=clean_env(**env),
        capture_output=True, text=True, timeout=60,
    )


def test_config_shows_values_and_sources(workdir: Path) -> None:
    (workdir / "aim_llama.toml").write_text('experiment = "from-file"\n')
    proc = cli("config", cwd=workdir, AIM_REPO="aim://127.0.0.1:53800", AIM_LLAMA_QUEUE_SIZE="")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert '"from-file"' in lines["experiment"]
    assert f"({workdir / 'aim_llama.toml'}: experiment)" in lines["experiment"]
    assert "(env AIM_REPO)" in lines["repo"]
    assert "(default)" in lines["queue_size"]  # empty env var = unset
    assert set(lines) == set(FIELDS)


def test_config_shows_what_an_unset_repo_and_experiment_mean(workdir: Path) -> None:
    proc = cli("config", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert json.dumps(str(workdir / ".aim")) in lines["repo"]
    assert "(default: .aim in the working directory)" in lines["repo"]
    assert '"default"' in lines["experiment"] and "Aim's default experiment" in lines["experiment"]
    as_json = json.loads(cli("config", "--json", cwd=workdir).stdout)
    # machines see the unset, and what it means
    assert as_json["repo"] == {"value": None, "source": "default", "means": str(workdir / ".aim")}
    assert as_json["experiment"]["means"] == "default" and "means" not in as_json["queue_size"]
    doctor = cli("doctor", cwd=workdir)  # the same words as `config`
    assert (f"valid; repo = {workdir / '.aim'} (default: .aim in the working directory)"
            in doctor.stdout), doctor.stdout


def test_config_json_and_secret_redaction(workdir: Path) -> None:
    proc = cli(
        "config", "--json", cwd=workdir,
        AIM_RUN_PARAMS='{"api_key": "sk-live-123", "team": "x"}',
    )
    data = json.loads(proc.stdout)
    assert data["run_params"]["value"] == {"api_key": "***", "team": "x"}
    assert data["run_params"]["source"] == "env AIM_RUN_PARAMS"
    assert "sk-live-123" not in proc.stdout
    assert data["strict"] == {"value": False, "source": "default"}


def test_config_invalid_exits_1_with_one_line(workdir: Path) -> None:
    proc = cli("config", cwd=workdir, AIM_SYSTEM_TRACKING_INTERVAL="abc")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1
    assert "AIM_SYSTEM_TRACKING_INTERVAL='abc'" in err[0] and "Traceback" not in proc.stderr


def test_console_script_is_installed(workdir: Path) -> None:
    exe = Path(sys.executable).parent / "aim-llama"
    proc = subprocess.run([str(exe), "config", "--json"], cwd=workdir, env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "system_tracking_interval" in json.loads(proc.stdout)


def test_example_config_documents_every_setting_and_is_valid(workdir: Path) -> None:
    example = ROOT / "config" / "aim_llama.toml"
    text = example.read_text()
    for name in FIELDS:
        assert f"{name} =" in text or f"[{name}]" in text, f"{name} undocumented"
    proc = cli("config", "--json", cwd=workdir, AIM_LLAMA_CONFIG=str(example))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["writer"]["source"].endswith("aim_llama.toml: writer")
    # the same, as a newcomer checks a file: `aim-llama config --file PATH`
    proc = cli("config", "--json", "--file", str(example), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["writer"]["source"] == f"{example}: writer"
    # a copied example must not make every Python start parse TOML (the switches' quick path
    # parses a file only for a line that sets one of them)
    from aim_llama.switches import ENV

    for switch in ENV:
        assert not [line for line in text.splitlines() if line.startswith(f"{switch} =")], switch


def test_errors_name_a_relatively_given_config_file_by_its_full_path(workdir: Path) -> None:
    (workdir / "cfg").mkdir()
    (workdir / "cfg" / "b.toml").write_text("queue_sz = 1\n")
    proc = cli("config", cwd=workdir, AIM_LLAMA_CONFIG="cfg/b.toml")
    assert proc.returncode == 1
    assert f"{workdir / 'cfg' / 'b.toml'}: unknown setting 'queue_sz'" in proc.stderr, proc.stderr
    proc = cli("config", "--file", "cfg/b.toml", cwd=workdir)
    assert proc.returncode == 1
    assert f"{workdir / 'cfg' / 'b.toml'}: unknown setting 'queue_sz'" in proc.stderr, proc.stderr
    proc = cli("config", "--file=~/cfg/b.toml", cwd=workdir, HOME=str(workdir))  # as the env var
    assert f"{workdir / 'cfg' / 'b.toml'}: unknown setting 'queue_sz'" in proc.stderr, proc.stderr
    # ...and a file that is not there, or cannot be read, too (they were named as typed)
    proc = cli("config", cwd=workdir, AIM_LLAMA_CONFIG="cfg/nope.toml")
    assert (f"config file {str(workdir / 'cfg' / 'nope.toml')!r} does not exist (named by env "
            "AIM_LLAMA_CONFIG)") in proc.stderr, proc.stderr
    # given as an option, it is blamed on the option (not on a variable never set)
    proc = cli("config", "--file", "cfg/nope.toml", cwd=workdir)
    assert (f"config file {str(workdir / 'cfg' / 'nope.toml')!r} does not exist (named by "
            "aim-llama config --file)") in proc.stderr, proc.stderr
    os.mkfifo(workdir / "cfg" / "fifo.toml")  # nobody writes it: read for a while, then refused
    proc = cli("config", cwd=workdir, AIM_LLAMA_CONFIG="cfg/fifo.toml")
    assert proc.returncode == 1
    assert f"cannot read config file {workdir / 'cfg' / 'fifo.toml'}: " in proc.stderr, proc.stderr


def test_a_reader_that_leaves_early_gets_no_traceback(workdir: Path) -> None:
    """`aim-llama config | head -1`: the status of a program killed by SIGPIPE, nothing on stderr."""
    proc = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m aim_llama config --json | true; "
                       "echo STATUS ${PIPESTATUS[0]} >&2"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip() == "STATUS 141", proc.stderr


def test_an_unknown_option_is_blamed_on_the_command_it_was_typed_to(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv, who in ((["--bogus", "config"], "aim-llama: error"),
                      (["config", "--bogus"], "aim-llama config: error")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert f"{who}: unrecognized arguments: --bogus" in err, (argv, err)


def test_an_unreadable_pyproject_is_skipped_with_one_warning(workdir: Path) -> None:
    """pyproject.toml is read whatever AIM_LLAMA_CONFIG says and may not be ours: one that
    cannot be read is a warning (its table not applied), not an error that stops recording."""
    pyproject = workdir / "pyproject.toml"
    pyproject.write_text("[tool.aim_llama]\nqueue_size = 5\n")  # invalid: proves it is not read
    pyproject.chmod(0)
    for command in ("config", "doctor"):
        proc = subprocess.run(unprivileged([sys.executable, "-m", "aim_llama", command]),
                              cwd=workdir, env=clean_env(), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        said = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "pyproject.toml" in line]
        assert len(said) == 1 and "its [tool.aim_llama] table, if any, is not applied" in said[0]
        assert str(pyproject) in said[0] and "ermission denied" in said[0], said
        if command == "config":
            assert said[0].startswith("aim-llama: warning: ")
            assert any(line.split()[:2] == ["queue_size", "50000"]
                       for line in proc.stdout.splitlines()), proc.stdout
        else:
            assert said[0].startswith("warn  config "), proc.stdout


def test_an_error_line_never_prints_a_password(workdir: Path) -> None:
    proc = cli("config", cwd=workdir, AIM_REPO="aim://admin:hunter2secret@tracking:53800")
    assert proc.returncode == 1 and "hunter2secret" not in proc.stderr
    assert "aim://admin:***@tracking:53800" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_config_shows_no_secret_in_lists_or_known_shapes(workdir: Path) -> None:
    params = ('{"dbs": ["postgresql://u:hunter2@h/db"], "hdrs": [{"api_key": "k1-hunter3"}], '
              '"openai": "sk-proj-abcdefghijklmnopqrstuvwx", "n": 3}')
    for args in ((), ("--json",)):
        proc = cli("config", *args, cwd=workdir, AIM_RUN_PARAMS=params)
        assert proc.returncode == 0, proc.stderr
        for secret in ("hunter2", "hunter3", "abcdefghijklmnop"):
            assert secret not in proc.stdout, (args, proc.stdout)
        assert "postgresql://u:***@h/db" in proc.stdout


def test_values_are_shown_as_they_are_and_never_break_an_ascii_output(workdir: Path) -> None:
    proc = cli("config", cwd=workdir, AIM_EXPERIMENT="実験")
    assert proc.returncode == 0 and '"実験"' in proc.stdout, proc.stderr
    proc = cli("config", cwd=workdir, AIM_EXPERIMENT="実験\u2028x", PYTHONIOENCODING="ascii")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("experiment")]
    assert '"\\u5b9f\\u9a13\\u2028x"' in line, line  # (escaped, and on its one line)
    proc = cli("config", "--json", cwd=workdir, AIM_EXPERIMENT="実験 café😀",
               PYTHONIOENCODING="latin-1")  # (JSON's own escapes: valid on any output)
    assert json.loads(proc.stdout)["experiment"]["value"] == "実験 café😀", proc.stderr


def test_a_deleted_working_directory_is_one_line_not_a_traceback(workdir: Path) -> None:
    gone = workdir / "gone"
    for command in ("config", "doctor"):
        gone.mkdir()
        proc = subprocess.run(
            ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
             sys.executable, "-m", "aim_llama", command],
            env=clean_env(), capture_output=True, text=True, timeout=60)
        said = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "working directory" in line]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(said) == 1 and "invalid setting repo (default)" in said[0], said
        assert "set AIM_REPO to an absolute path" in said[0]


def test_paths_with_a_newline_keep_every_message_on_one_line(workdir: Path) -> None:
    (workdir / "bad\nname.toml").write_text("queue_size = \n")
    proc = cli("config", cwd=workdir, AIM_LLAMA_CONFIG="bad\nname.toml")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{workdir}/bad\\nname.toml is not valid TOML" in proc.stderr, proc.stderr
    odd = workdir / "d\nir"
    odd.mkdir()
    (odd / "aim_llama.toml").write_text('experiment = "e"\n')
    proc = cli("config", cwd=odd)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == len(FIELDS), proc.stdout
    assert f"({workdir}/d\\nir/aim_llama.toml: experiment)" in proc.stdout, proc.stdout
    doctor = cli("doctor", cwd=odd)
    assert len(doctor.stdout.splitlines()) == 2 and "d\\nir/.aim" in doctor.stdout, doctor.stdout
    (odd / "aim_llama.toml").write_text("queue_size = 5\n")
    for command in ("config", "doctor"):
        proc = cli(command, cwd=odd)
        assert proc.returncode == 1 and len(proc.stdout.splitlines()) <= 1
        out = proc.stdout if command == "doctor" else proc.stderr
        assert len(out.splitlines()) == 1 and "d\\nir/aim_llama.toml: queue_size = 5" in out, out
