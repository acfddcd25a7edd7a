"""`aim-llama run` and its start-up hook, end to end through real subprocesses and a real Aim repo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aim_llama.launcher import BOOTSTRAP_DIR
from aim_llama.launcher.command import OPTIONS, exit_status, ignoring_options, prepend_bootstrap
from aim_llama.launcher.startup import command_name, is_skipped
from aimread import run_hashes
from conftest import APPS, clean_env, only_run

AIM_LLAMA = str(Path(sys.executable).with_name("aim-llama"))
HEAVY = ("llama_index", "aim", "pydantic_settings", "pydantic")

# Prints what activation did in this process (used as a child program under the launcher).
PROBE = f"""
import json, os, sys
from aim_llama.importhook import PostImportFinder
print("PROBE", json.dumps({{
    "pid": os.getpid(),
    "auto": "aim_llama.auto" in sys.modules,
    "hooks": sum(isinstance(f, PostImportFinder) for f in sys.meta_path),
    "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})),
    "bootstrap_on_pythonpath": {BOOTSTRAP_DIR!r} in os.environ.get("PYTHONPATH", ""),
}}), flush=True)
"""


# A small LlamaIndex program with no aim-llama line: N completions through MockLLM.
LIGHT = (
    "import sys, aim_llama\n"
    "from llama_index.core.llms import MockLLM\n"
    "llm = MockLLM(max_tokens=3)\n"
    "for i in range(int(sys.argv[1])): llm.complete(f'light {i}')\n"
    "print('INSTRUMENTED', aim_llama.is_instrumented(), flush=True)\n"
)


def probe_of(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("PROBE ")]


def launch(
    args: list[str],
    cwd: Path,
    repo: Path | None = None,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    extra = {"AIM_REPO": str(repo)} if repo is not None else {}
    extra.update(env or {})
    return subprocess.run(
        [*(launcher or [AIM_LLAMA]), "run", *args], cwd=cwd, env=clean_env(**extra),
        capture_output=True, text=True, timeout=timeout,
    )


def test_example_app_records_its_prompts_and_exit_code_passes_through(workdir, repo):
    proc = launch(
        ["--experiment", "launched", "--run-params", '{"team": "search"}', "--",
         sys.executable, str(APPS / "rag.py"), "3", "--no-auto", "--exit-code", "3"],
        workdir, repo,
    )
    assert proc.returncode == 3, proc.stderr
    assert "DONE" in proc.stdout
    run = only_run(repo)
    assert run.experiment == "launched"
    assert run.params["team"] == "search"
    assert run.end_time is not None and not run.active
    prompts = run.text("prompt", kind="llm")
    assert [s for s, _ in prompts] == [0, 1, 2]
    assert "question 2: what about topic 2?" in prompts[2][1]
    assert run.params["aim_llama"]["role"] == "main"


def test_python_dash_m_launcher_runs_a_python_dash_m_package(workdir, repo):
    pkg = workdir / "ragpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(LIGHT)
    proc = launch(["--", sys.executable, "-m", "ragpkg", "2"], workdir, repo,
                  launcher=[sys.executable, "-m", "aim_llama"])
    assert proc.returncode == 0, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["light 0", "light 1"]
    assert run.end_time is not None


def test_console_script_on_path_is_launched(workdir, repo, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "rag-tool"
    script.write_text(f"#!{sys.executable}\n" + LIGHT)
    script.chmod(0o755)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = launch(["rag-tool", "1"], workdir, repo, env={"PATH": path})
    assert proc.returncode == 0, proc.stderr
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["light 0"]


@pytest.mark.new_repo
def test_process_without_llamaindex_is_lazy_and_leaves_no_run(workdir, repo):
    code = PROBE + "import json, email.parser, sqlite3\nprint('ok')\n"
    proc = launch(["--", sys.executable, "-c", code], workdir, repo)
    assert proc.returncode == 0, proc.stderr
    (probe,) = probe_of(proc.stdout)
    probe.pop("pid")
    assert probe == {"auto": True, "hooks": 1, "heavy": [], "bootstrap_on_pythonpath": True}
    assert proc.stderr == ""
    assert run_hashes(repo) == []
    assert not repo.exists()  # not even an empty repo


def test_users_own_sitecustomize_still_runs(workdir, repo, tmp_path):
    site = tmp_path / "usersite"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nos.environ['USER_SITE_RAN'] = 'yes'\nprint('USER SITECUSTOMIZE', sys.argv[0])\n"
    )
    code = PROBE + "import os, sitecustomize\nprint('ENV', os.environ.get('USER_SITE_RAN'))\n" \
        "print('MODULE', sitecustomize.__file__)\n"
    proc = launch(["--", sys.executable, "-c", code], workdir, repo, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    # once in the program (the launcher's own interpreter ran it too, before exec-ing)
    assert proc.stdout.count("USER SITECUSTOMIZE -c\n") == 1
    assert "ENV yes" in proc.stdout
    assert f"MODULE {site / 'sitecustomize.py'}" in proc.stdout
    assert probe_of(proc.stdout)[0]["auto"] is True


def test_broken_user_sitecustomize_is_reported_like_site_does_and_app_runs(workdir, tmp_path):
    site = tmp_path / "usersite"
    site.mkdir()
    (site / "sitecustomize.py").write_text("raise ValueError('user bug')\n")
    proc = launch(["--", sys.executable, "-c", PROBE], workdir, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0
    assert "Error in sitecustomize; set PYTHONVERBOSE for traceback:\nValueError: user bug" in proc.stderr
    assert probe_of(proc.stdout)[0]["auto"] is True


def test_a_python_without_aim_llama_is_reported_once_and_runs(workdir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "aim_llama").mkdir(parents=True)
    (broken / "aim_llama" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    code = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'])\nprint('APP RAN')\n"
    # (the launcher itself must import aim_llama: hide it only from the command's Python)
    shell = f'PYTHONPATH="$PYTHONPATH{os.pathsep}{broken}" exec "$0" -c "$1"'
    proc = launch(["--", "sh", "-c", shell, sys.executable, code], workdir)
    assert proc.returncode == 0 and "APP RAN" in proc.stdout
    assert proc.stderr.count("cannot import aim_llama (simulated: not installed)") == 1, proc.stderr


def test_an_interpreter_option_that_skips_the_hook_is_said(workdir, repo):
    """`aim-llama run -- python -I app.py` recorded nothing and said nothing."""
    app = "from llama_index.core.llms import MockLLM\nMockLLM().complete('hi')\nprint('APP RAN')"
    proc = launch(["--", sys.executable, "-I", "-c", app], workdir, repo)
    assert proc.returncode == 0 and "APP RAN" in proc.stdout, proc.stderr
    name = os.path.basename(sys.executable)
    assert proc.stderr.count("aim-llama run: ") == 1, proc.stderr
    assert f"aim-llama run: {name} -I ignores PYTHONPATH (isolated mode): aim-llama's start-up " \
           "hook does not load there" in proc.stderr, proc.stderr
    assert run_hashes(repo) == []
    # the same interpreter without it records, and says nothing of the kind
    proc = launch(["--", sys.executable, "-B", "-c", app], workdir, repo)
    assert proc.returncode == 0 and "aim-llama run:" not in proc.stderr, proc.stderr
    assert len(run_hashes(repo)) == 1


def test_which_interpreter_options_skip_the_hook():
    assert ignoring_options(["python3", "-I", "app.py"]) == ["-I"]
    assert ignoring_options(["/venv/bin/python3.11", "-BES", "app.py"]) == ["-E", "-S"]
    assert ignoring_options(["python", "-W", "ignore", "-sE", "-m", "app"]) == ["-E"]
    assert ignoring_options(["python", "-WI", "app.py"]) == []  # -W's value, `I`
    assert ignoring_options(["python", "-X", "-I", "app.py"]) == []  # -X's value
    assert ignoring_options(["python", "-c", "pass", "-I"]) == []  # the program's own argv
    assert ignoring_options(["python", "-mIpkg"]) == []
    assert ignoring_options(["python", "app.py", "-I"]) == []
    assert ignoring_options(["python", "--check-hash-based-pycs", "-I", "app.py"]) == []
    assert ignoring_options(["python", "-u", "--", "-I"]) == []
    assert ignoring_options(["uvicorn", "-I"]) == [] and ignoring_options([]) == []
    assert ignoring_options(["python3.12t", "-I", "x"]) == ["-I"]


def test_activation_happens_once_with_every_path_combined(workdir, repo, tmp_path):
    site = tmp_path / "usersite"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import aim_llama.auto\n")
    code = PROBE + textwrap.dedent(
        """
        import aim_llama.auto, aim_llama
        from llama_index.core import Settings
        from llama_index.core.llms import MockLLM
        from aim_llama.handler import AimLlamaHandler
        aim_llama.instrument()
        MockLLM(max_tokens=3).complete("only once")
        print("HANDLERS", sum(isinstance(h, AimLlamaHandler) for h in Settings.callback_manager.handlers))
        """
    )
    proc = launch(["--", sys.executable, "-c", code], workdir, repo, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert probe_of(proc.stdout)[0]["hooks"] == 1
    assert [line for line in proc.stdout.splitlines() if line.startswith("HANDLERS")] == ["HANDLERS 1"]
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["only once"]


@pytest.mark.parametrize(
    ("mode", "code", "expected"),
    [
        ("exec", "raise SystemExit(7)", 7),
        ("spawn", "raise SystemExit(7)", 7),
        ("exec", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM),
        ("spawn", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
    ],
)
def test_exit_status_is_the_commands(workdir, mode, code, expected):
    args = ["--spawn"] if mode == "spawn" else []
    proc = launch([*args, "--", sys.executable, "-c", code], workdir)
    assert proc.returncode == expected


def test_missing_command_and_unknown_program(workdir):
    assert launch([], workdir).returncode == 2
    proc = launch(["--", "no-such-program-xyz"], workdir)
    assert proc.returncode == 127
    assert "command not found" in proc.stderr


def test_help_lists_every_setting_with_its_env_var():
    from aim_llama.settings import ENV_NAMES

    proc = subprocess.run([AIM_LLAMA, "run", "--help"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())
    for env in [*ENV_NAMES.values(), "AIM_LLAMA_CONFIG"]:
        assert env in flat, env
    assert {o.setting: o.env for o in OPTIONS if o.setting} == ENV_NAMES  # table in sync
    assert "--set NAME=VALUE" in flat
    for flag in ("--repo", "--experiment", "--no-propagate", "--disable", "--spawn", "--strict"):
        assert flag in flat


def _parent_with_child(extra: str = "") -> str:
    return PROBE + textwrap.dedent(
        f"""
        import subprocess, sys
        {extra}
        subprocess.run([sys.executable, "-c", {PROBE!r}], check=True)
        """
    )


def test_children_inherit_activation_by_default(workdir):
    proc = launch(["--", sys.executable, "-c", _parent_with_child()], workdir)
    assert proc.returncode == 0, proc.stderr
    assert [p["auto"] for p in probe_of(proc.stdout)] == [True, True]


@pytest.mark.parametrize("how", ["option", "env", "toml"])
def test_propagation_can_be_turned_off(workdir, how):
    args: list[str] = []
    env: dict[str, str] = {}
    if how == "option":
        args = ["--no-propagate"]
    elif how == "env":
        env = {"AIM_LLAMA_PROPAGATE": "false"}
    else:
        (workdir / "aim_llama.toml").write_text("propagate = false\n")
    proc = launch([*args, "--", sys.executable, "-c", _parent_with_child()], workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    parent, child = probe_of(proc.stdout)
    assert parent["auto"] is True and parent["bootstrap_on_pythonpath"] is False
    assert child["auto"] is False and child["hooks"] == 0


def test_pip_and_aim_cli_are_never_instrumented(workdir, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("pip", "pip3.11", "aim", "myapp"):
        script = bindir / name
        script.write_text(f"#!{sys.executable}\n{PROBE}")
        script.chmod(0o755)
    for name, expected in (("pip", False), ("pip3.11", False), ("aim", False), ("myapp", True)):
        proc = launch(["--", str(bindir / name)], workdir)
        assert proc.returncode == 0, proc.stderr
        assert probe_of(proc.stdout)[0]["auto"] is expected, name
    # the real pip, as `python -m pip`, works and is left alone too (aim_llama.auto is never
    # imported in it, as it is in any other Python the launcher starts)
    proc = launch(["--", sys.executable, "-X", "importtime", "-m", "pip", "--version"], workdir)
    assert proc.returncode == 0 and proc.stdout.startswith("pip ")
    assert "aim_llama.launcher.startup" in proc.stderr and "aim_llama.auto" not in proc.stderr
    proc = launch(["--", sys.executable, "-X", "importtime", "-c", "pass"], workdir)
    assert proc.returncode == 0 and "aim_llama.auto" in proc.stderr


def test_command_name_parsing():
    assert command_name(["py", "-m", "pip", "install", "x"], "-m") == "pip"
    assert command_name(["py", "-X", "importtime", "-mpip"], "-m") == "pip"
    assert command_name(["py", "-m", "aim.cli", "up"], "-m") == "aim"
    assert command_name(["py", "/v/bin/pip3.12", "list"], "/v/bin/pip3.12") == "pip3.12"
    assert command_name(["py", "-c", "pass"], "-c") == ""
    assert command_name(["py", "app.py"], "app.py") == "app"
    assert command_name(["py", "-Bm", "pip", "list"], "-m") == "pip"  # combined flags
    assert command_name(["py", "-Bmpip"], "-m") == "pip"
    assert command_name(["py", "-W", "ignore", "-X", "dev", "-m", "aim"], "-m") == "aim"
    assert command_name(["py", "-c", "x", "-m", "pip"], "-c") == ""  # -m is the code's argument
    assert is_skipped("pip") and is_skipped("pip3.12") and is_skipped("aim")
    assert not is_skipped("pipeline") and not is_skipped("app") and not is_skipped("")


def test_options_and_set_map_to_env():
    import argparse

    from aim_llama.launcher.command import add_run_parser, child_env, env_for
    from aim_llama.settings import ENV_NAMES

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_run_parser(sub, lambda a: 0)
    args = parser.parse_args(["--repo", "r", "--strict", "--no-propagate", "--set", "sample_rate=0.5",
                              "--set", "AIM_EXPERIMENT=e", "python", "x.py"])
    env = child_env(args, {"PYTHONPATH": "/a"})
    assert env["AIM_REPO"] == os.path.abspath("r") and env["AIM_LLAMA_STRICT"] == "true"
    assert env["AIM_LLAMA_PROPAGATE"] == "false" and env["AIM_LLAMA_SAMPLE_RATE"] == "0.5"
    assert env["AIM_EXPERIMENT"] == "e" and env["PYTHONPATH"] == f"{BOOTSTRAP_DIR}{os.pathsep}/a"
    assert args.cmd == ["python", "x.py"]  # the `--` separator is optional
    for name, var in ENV_NAMES.items():
        assert env_for(name) == var and env_for(var) == var and env_for("--" + name.replace("_", "-")) == var
    assert env_for("experimnet") is None


def test_a_misspelt_aim_address_on_the_command_line_is_not_taken_for_a_path(workdir):
    proc = launch(["--repo", "aim:host:53800", "--", sys.executable, "-c", "import aim_llama.auto, "
                   "llama_index.core"], workdir)
    assert proc.returncode == 0
    assert "'aim:host:53800' is not an aim://host:port address" in proc.stderr, proc.stderr
    assert list(workdir.iterdir()) == []  # no directory `aim:host:53800` made


@pytest.mark.parametrize(("args", "said"), [
    (["--queue-size", "300", "--set", "queue_size=200"],
     "--queue-size and --set queue_size both set AIM_LLAMA_QUEUE_SIZE"),
    (["--set", "AIM_LLAMA_QUEUE_SIZE=200", "--queue-size=300"],
     "--set AIM_LLAMA_QUEUE_SIZE and --queue-size both set AIM_LLAMA_QUEUE_SIZE"),
    (["--experiment", "a", "--experiment", "b"], "--experiment is given twice"),
    (["--propagate", "true", "--no-propagate"],
     "--propagate and --no-propagate both set AIM_LLAMA_PROPAGATE"),
    (["--disable", "--set", "enabled=true"], "--disable and --set enabled both set AIM_LLAMA_ENABLED"),
])
def test_a_setting_given_twice_is_a_usage_error_naming_both(workdir, args, said):
    marker = workdir / "ran"
    proc = launch([*args, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"], workdir)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.splitlines() == [f"aim-llama run: error: {said}; give each setting once"]


def test_bad_set_is_a_usage_error(workdir):
    proc = launch(["--set", "rep=aim://admin:hunter2@h:1", "--", sys.executable, "-c", "pass"],
                  workdir)  # (its usage error quotes the value: not the password)
    assert proc.returncode == 2 and "aim://admin:***@h:1" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr
    proc = launch(["--set", "api_key=secretvalue", "--", sys.executable, "-c", "pass"], workdir)
    assert proc.stderr.startswith("aim-llama run: error: --set 'api_key=***': expected NAME=VALUE"), \
        proc.stderr
    proc = launch(["--set", "experimnet=x", "--", sys.executable, "-c", "pass"], workdir)
    assert proc.returncode == 2 and "experimnet" in proc.stderr
    assert "did you mean 'experiment'?" in proc.stderr, proc.stderr  # as env and TOML typos
    proc = launch(["--set", "AIM_LLAMA_QUEUESIZE=5", "--", sys.executable, "-c", "pass"], workdir)
    assert proc.returncode == 2 and "did you mean 'AIM_LLAMA_QUEUE_SIZE'?" in proc.stderr


def test_bootstrap_is_prepended_once():
    assert prepend_bootstrap(None) == BOOTSTRAP_DIR
    twice = prepend_bootstrap(prepend_bootstrap(f"/a{os.pathsep}/b"))
    assert twice.split(os.pathsep) == [BOOTSTRAP_DIR, "/a", "/b"]
    # an empty entry is the working directory to Python: kept (leading, trailing, alone)
    assert prepend_bootstrap(f"{os.pathsep}/x").split(os.pathsep) == [BOOTSTRAP_DIR, "", "/x"]
    assert prepend_bootstrap(f"/x{os.pathsep}").split(os.pathsep) == [BOOTSTRAP_DIR, "/x", ""]
    assert exit_status(-15) == 143 and exit_status(4) == 4
    import aim_llama.auto

    assert aim_llama.auto.BOOTSTRAP_DIR == BOOTSTRAP_DIR
    assert (Path(BOOTSTRAP_DIR) / "sitecustomize.py").is_file()
    assert sorted(p.name for p in Path(BOOTSTRAP_DIR).iterdir() if p.suffix == ".py") == ["sitecustomize.py"]


LIGHT_CMD = ["--", sys.executable, "-c", LIGHT, "2"]


@pytest.mark.parametrize("how", ["option", "toml"])
def test_kill_switch_through_the_launcher(workdir, repo, how):
    if how == "toml":
        (workdir / "aim_llama.toml").write_text("enabled = false\n")
    proc = launch([*(["--disable"] if how == "option" else []), *LIGHT_CMD], workdir, repo)
    assert proc.returncode == 0, proc.stderr
    assert "INSTRUMENTED False" in proc.stdout
    assert run_hashes(repo) == []


def test_config_error_is_reported_once_per_process_and_app_runs(workdir, repo):
    code = textwrap.dedent(
        """
        import subprocess, sys, aim_llama
        from llama_index.core.llms import MockLLM
        print("INSTRUMENTED", aim_llama.instrument(), aim_llama.instrument())
        MockLLM(max_tokens=2).complete("x")
        child = [sys.executable, "-c", "import llama_index.core, aim_llama; aim_llama.instrument()"]
        subprocess.run(child)
        import os
        subprocess.run(child, env={**os.environ, "AIM_SYSTEM_TRACKING_INTERVAL": "xyz"})
        print("APP DONE")
        """
    )
    proc = launch(["--system-tracking-interval", "abc", "--", sys.executable, "-c", code], workdir, repo)
    assert proc.returncode == 0, proc.stderr
    assert "INSTRUMENTED False False" in proc.stdout and "APP DONE" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "AIM_SYSTEM_TRACKING_INTERVAL" in line]
    assert len(lines) == 3, proc.stderr  # parent once, each child once
    # the option the user typed is named (the launcher passes it as an env var)...
    assert all("(aim-llama run --system-tracking-interval 'abc', passed as env "
               "AIM_SYSTEM_TRACKING_INTERVAL)" in line for line in lines[:2]), lines
    # ...but not for a value the program changed before passing it on
    assert "(env AIM_SYSTEM_TRACKING_INTERVAL='xyz')" in lines[2], lines
    assert "Traceback" not in proc.stderr
    assert run_hashes(repo) == []
    missing = launch(["--config", "missing.toml", "--set", "sample_rate=2", *LIGHT_CMD], workdir,
                     repo)
    assert (f"config file {str(workdir / 'missing.toml')!r} does not exist (named by aim-llama "
            "run --config, passed as env AIM_LLAMA_CONFIG)") in missing.stderr, missing.stderr
    (workdir / "aim_llama.toml").write_text("queue_size = 100\n")
    typed = launch(["--set", "sample_rate=2", *LIGHT_CMD], workdir, repo)
    assert ("invalid setting sample_rate (aim-llama run --set sample_rate '2', passed as env "
            "AIM_LLAMA_SAMPLE_RATE)") in typed.stderr, typed.stderr
    listed = launch(["--experiment", "e", "--", AIM_LLAMA, "config"], workdir, repo)
    assert re.search(r"experiment +\"e\" +\(aim-llama run --experiment, passed as env "
                     r"AIM_EXPERIMENT\)", listed.stdout), listed.stdout
    assert re.search(r"queue_size +100 +\(.*aim_llama.toml: queue_size\)", listed.stdout)
    plain = launch([*LIGHT_CMD], workdir, repo, env={"AIM_LLAMA_SAMPLE_RATE": "2"})
    assert "(env AIM_LLAMA_SAMPLE_RATE='2')" in plain.stderr, plain.stderr


def test_strict_mode_through_the_launcher_matches_the_import(workdir, repo):
    bad = {"AIM_SYSTEM_TRACKING_INTERVAL": "abc"}
    launched = launch(["--strict", "--", sys.executable, "-c", "print('APP RAN')"], workdir, repo, env=bad)
    imported = subprocess.run(
        [sys.executable, "-c", "import aim_llama.auto; print('APP RAN')"], cwd=workdir,
        env=clean_env(AIM_LLAMA_STRICT="true", **bad), capture_output=True, text=True,
    )
    for proc in (launched, imported):
        assert proc.returncode == 1
        assert "APP RAN" not in proc.stdout
        assert "AIM_SYSTEM_TRACKING_INTERVAL='abc'" in proc.stderr
    assert launched.stderr.strip().count("\n") == 0  # one line, no traceback
    assert run_hashes(repo) == []


@pytest.mark.parametrize("hook", ["sitecustomize", "pth"])
def test_strict_mode_stops_a_program_from_a_start_up_hook_but_not_pip(workdir, tmp_path, hook):
    """`site` catches what a sitecustomize or a `.pth` line raises and runs the program anyway:
    strict mode ends it instead (one line, status 1). pip still runs, to fix the environment."""
    hooks, site_dir = tmp_path / "hooks", tmp_path / "site-packages"
    hooks.mkdir()
    site_dir.mkdir()
    (site_dir / "aim_llama_auto.pth").write_text("import aim_llama.auto\n")
    if hook == "sitecustomize":
        (hooks / "sitecustomize.py").write_text("import aim_llama.auto\n")
    else:  # a .pth file in a site directory that `site` reads at start-up
        (hooks / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    env = clean_env(AIM_LLAMA_STRICT="true", AIM_SYSTEM_TRACKING_INTERVAL="abc", PYTHONPATH=str(hooks))

    def python(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=workdir, env={**env, **extra},
                              capture_output=True, text=True)

    proc = python("-c", "print('APP RAN')")
    assert proc.returncode == 1, proc.stderr
    assert "APP RAN" not in proc.stdout
    assert proc.stderr.startswith("aim_llama: error: invalid setting system_tracking_interval"), proc.stderr
    assert "AIM_SYSTEM_TRACKING_INTERVAL='abc'" in proc.stderr and proc.stderr.count("\n") == 1
    pip = python("-m", "pip", "--version")
    assert pip.returncode == 0 and pip.stdout.startswith("pip "), pip.stderr
    assert "ConfigError: invalid setting system_tracking_interval" in pip.stderr  # site's report
    relaxed = python("-c", "print('APP RAN')", AIM_LLAMA_STRICT="false")
    assert relaxed.returncode == 0 and "APP RAN" in relaxed.stdout, relaxed.stderr
    # a program's own later `site.addsitedir` is not start-up: the error is site's to report
    later = python("-c", f"import site; site.addsitedir({str(site_dir)!r}); print('APP RAN')",
                   PYTHONPATH="")
    assert later.returncode == 0 and "APP RAN" in later.stdout, later.stderr
    assert "ConfigError" in later.stderr


@pytest.mark.parametrize("propagate", [True, False])
def test_empty_pythonpath_entries_still_mean_the_working_directory(workdir, tmp_path, propagate):
    """`export PYTHONPATH=$PYTHONPATH:/x` with PYTHONPATH unset gives `:/x`: the empty entry is
    the working directory, for the command and (with --no-propagate too) for its children."""
    (workdir / "localmod.py").write_text("WHERE = __file__\n")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "app.py").write_text(
        "import os, subprocess, sys, localmod\n"
        "print('PARENT', localmod.WHERE)\n"
        "subprocess.run([sys.executable, '-c', 'import localmod; print(\"CHILD\", localmod.WHERE)'],"
        " check=True)\n"
    )
    args = [] if propagate else ["--no-propagate"]
    proc = launch([*args, "--", sys.executable, str(scripts / "app.py")], workdir,
                  env={"PYTHONPATH": f"{os.pathsep}/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    assert f"PARENT {workdir / 'localmod.py'}" in proc.stdout
    assert f"CHILD {workdir / 'localmod.py'}" in proc.stdout


@pytest.mark.parametrize("what", ["no shebang", "not a directory"])
def test_spawn_reports_a_command_it_cannot_execute_in_one_line(workdir, what):
    target = workdir / "noshebang"
    target.write_text("echo hi\n")
    target.chmod(0o755)
    cmd = "./noshebang" if what == "no shebang" else "./noshebang/x"
    for mode in (["--spawn"], []):
        proc = launch([*mode, "--", cmd], workdir)
        assert proc.returncode == 126, (mode, proc.stderr)
        assert proc.stderr.startswith("aim-llama run: cannot execute './noshebang")
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def spawn_python(code: str, cwd: Path, **popen: Any) -> subprocess.Popen[str]:
    """`aim-llama run --spawn -- python -c CODE` in a session of its own, its stdout readable."""
    return subprocess.Popen(
        [AIM_LLAMA, "run", "--spawn", "--", sys.executable, "-c", code], cwd=cwd,
        env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, **popen,
    )


def test_spawn_forwards_a_sigint_sent_to_the_launcher(workdir):
    """Not from a terminal (no Ctrl-C reached the command itself): the launcher passes it on."""
    code = ("import time\n"
            "try:\n    print('READY', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('CHILD GOT SIGINT', flush=True)\n    raise SystemExit(6)\n")
    # (a test run started in the background of a non-interactive shell has SIGINT ignored,
    # which the launcher rightly keeps for its command: give it the default disposition)
    proc = spawn_python(code, workdir,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 6, err
    assert "CHILD GOT SIGINT" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_spawn_forwards_other_signals_sent_to_the_launcher(workdir, sig):
    """`kill` / a supervisor signals the launcher's process: the command gets the signal, and
    the launcher exits as the command did."""
    code = ("import signal, sys, time\n"
            f"signal.signal({int(sig)}, lambda n, f: (print('CHILD GOT', n, flush=True),"
            " sys.exit(6)))\n"
            "print('READY', flush=True)\ntime.sleep(60)\n")
    proc = spawn_python(code, workdir)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 6, err
    assert f"CHILD GOT {int(sig)}" in out


def test_relative_config_and_repo_options_mean_where_the_launcher_ran(workdir):
    """A child that runs in another directory still reads the same file and writes the same repo."""
    (workdir / "cfg.toml").write_text('experiment = "relative"\n')
    (workdir / "sub").mkdir()
    code = ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
            "'from llama_index.core.llms import MockLLM; MockLLM(max_tokens=2).complete(\"child\")'],"
            " cwd='sub', check=True)\n")
    proc = launch(["--config", "cfg.toml", "--repo", "./runs", "--", sys.executable, "-c", code],
                  workdir)
    assert proc.returncode == 0, proc.stderr
    assert "does not exist" not in proc.stderr
    assert not (workdir / "sub" / "runs").exists()
    run = only_run(workdir / "runs")
    assert run.experiment == "relative"
    assert [t for _, t in run.text("prompt", kind="llm")] == ["child"]


def test_pythons_a_shell_command_starts_do_not_each_say_they_lack_aim_llama(workdir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "aim_llama").mkdir(parents=True)
    (broken / "aim_llama" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    py = f'PYTHONPATH="$PYTHONPATH{os.pathsep}{broken}" "{sys.executable}" -c'
    shell = f"{py} 'print(1)'; {py} 'print(2)'; {py} 'print(3)'; true"
    proc = launch(["--", "sh", "-c", shell], workdir)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "2", "3"], proc.stderr
    assert "cannot import aim_llama" not in proc.stderr  # the command is sh, not a Python


def test_exec_mode_gives_the_command_default_sigpipe_and_a_closed_stdout_is_fine(workdir):
    """Python ignores SIGPIPE and SIGXFSZ; the command must not inherit that through exec (it
    would never die of a broken pipe), and a launcher whose stdout is closed still runs it."""
    proc = launch(["--", "grep", "^SigIgn", "/proc/self/status"], workdir)
    ignored = int(proc.stdout.split()[1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1)) == 0 and ignored & (1 << (signal.SIGXFSZ - 1)) == 0
    shell = subprocess.run(
        ["bash", "-c", f"{AIM_LLAMA} run -- seq 1 10000000 | head -1; echo STATUS ${{PIPESTATUS[0]}};"
                       f"{AIM_LLAMA} run -- sh -c 'echo ran >&2' >&-; echo CLOSED $?"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert "STATUS 141" in shell.stdout, shell  # died of SIGPIPE, as without the launcher
    assert "CLOSED 0" in shell.stdout and "ran" in shell.stderr, shell


def test_spawn_keeps_a_signal_the_launcher_was_started_with_ignored(workdir):
    """`nohup aim-llama run --spawn …`: SIGHUP stays ignored, in the command too."""
    code = ("import signal, time\n"
            "print('HUP IGNORED', signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, flush=True)\n"
            "time.sleep(2)\nprint('SURVIVED', flush=True)\n")
    proc = spawn_python(code, workdir,
                        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "HUP IGNORED True"
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "SURVIVED" in out, err


def test_no_propagate_takes_any_installs_bootstrap_off_pythonpath(tmp_path):
    from aim_llama.auto import strip_bootstrap_from_env

    other = str(tmp_path / "pipx" / "site-packages" / "aim_llama" / "launcher" / "bootstrap")
    env = {"PYTHONPATH": os.pathsep.join([BOOTSTRAP_DIR, other, "", "/keep/aim_llama"])}
    strip_bootstrap_from_env(env)
    assert env["PYTHONPATH"] == os.pathsep.join(["", "/keep/aim_llama"])


def test_spawn_in_a_terminal_delivers_terminal_signals_once(workdir):
    """Ctrl-\\ and a window resize reach the terminal's whole foreground group, the command
    included: the launcher must not forward them a second time (Ctrl-C's case as well)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    counter = (
        "import signal, sys\n"
        "seen = {'QUIT': 0, 'WINCH': 0}\n"
        "def on(name):\n    return lambda *a: seen.__setitem__(name, seen[name] + 1)\n"
        "signal.signal(signal.SIGQUIT, on('QUIT'))\nsignal.signal(signal.SIGWINCH, on('WINCH'))\n"
        "print('READY', flush=True)\nsys.stdin.readline()\nprint('SEEN', seen, flush=True)\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty as its terminal
        os.chdir(workdir)
        os.execve(AIM_LLAMA, [AIM_LLAMA, "run", "--spawn", "--", sys.executable, "-c", counter],
                  clean_env())
    out = b""

    def read_until(word: bytes, timeout: float = 30) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while word not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break

    try:
        read_until(b"READY")
        assert b"READY" in out, out
        os.write(fd, b"\x1c")  # Ctrl-\
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a resize
        time.sleep(1.0)
        os.write(fd, b"report\n")
        read_until(b"}")
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    assert b"SEEN {'QUIT': 1, 'WINCH': 1}" in out, out
