"""Activation and the run lifecycle, end to end through real subprocesses and a real Aim repo."""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from aimread import read_all, run_hashes
from conftest import APPS, only_run

COUNT_HANDLERS = """
        from llama_index.core import Settings
        from aim_llama.handler import AimLlamaHandler
        n = sum(isinstance(h, AimLlamaHandler) for h in Settings.callback_manager.handlers)
        print("HANDLERS", n)
"""


def count_of(stdout: str, label: str) -> int:
    """The number a program printed on its `LABEL N` line (exactly one such line)."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(label + " ")]
    return int(line.split()[1])


def test_idempotent_and_thread_safe_activation(run_py, repo):
    proc = run_py(
        """
        import importlib, threading
        import aim_llama.auto
        import aim_llama.auto
        importlib.reload(aim_llama.auto)
        import aim_llama
        from aim_llama import autoinstrument
        assert aim_llama.instrument() is True
        first = autoinstrument._active
        threads = [threading.Thread(target=aim_llama.instrument) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert aim_llama.instrument() is True
        print("SAME ACTIVATION", autoinstrument._active is first and first is not None)
        """
        + COUNT_HANDLERS
        + """
        from llama_index.core.instrumentation import get_dispatcher
        from aim_llama.dispatcher import AimEventHandler, AimSpanHandler
        root = get_dispatcher()
        print("SPAN_HANDLERS", sum(isinstance(h, AimSpanHandler) for h in root.span_handlers))
        print("EVENT_HANDLERS", sum(isinstance(h, AimEventHandler) for h in root.event_handlers))
        print("INSTRUMENTED", aim_llama.is_instrumented())
        """
    )
    assert count_of(proc.stdout, "HANDLERS") == 1
    assert count_of(proc.stdout, "SPAN_HANDLERS") == 1 == count_of(proc.stdout, "EVENT_HANDLERS")
    assert "SAME ACTIVATION True" in proc.stdout  # one writer, one signal chain: not rebuilt
    assert "INSTRUMENTED True" in proc.stdout
    assert run_hashes(repo) == []  # nothing was recorded, so no empty run was left behind


def test_uninstrument_flushes_finalizes_and_removes(run_py, repo):
    proc = run_py(
        """
        import aim_llama
        from llama_index.core.llms import MockLLM
        assert aim_llama.instrument(experiment="unit")
        llm = MockLLM(max_tokens=4)
        llm.complete("hello there")
        aim_llama.uninstrument()
        print("INSTRUMENTED", aim_llama.is_instrumented())
        """
        + COUNT_HANDLERS
        + """
        llm.complete("after uninstrument: not recorded")
        import os; os._exit(0)  # skip atexit: uninstrument() alone must have finalized the run
        """
    )
    assert "INSTRUMENTED False" in proc.stdout and count_of(proc.stdout, "HANDLERS") == 0
    run = only_run(repo)
    assert run.end_time is not None and not run.active
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert prompts == ["hello there"]


@pytest.mark.parametrize("module", ["dispatcher", "handler"])
def test_importing_an_aim_llama_module_before_llamaindex_still_activates(run_py, repo, module):
    """`aim_llama.dispatcher` / `.handler` import LlamaIndex at their top, so LlamaIndex finishes
    importing while they are half-run: activation waits for them instead of failing open."""
    proc = run_py(
        f"""
        import aim_llama.auto
        import aim_llama.{module}
        import aim_llama
        from llama_index.core.llms import MockLLM
        print("INSTRUMENTED", aim_llama.is_instrumented())
        MockLLM(max_tokens=4).complete("imported in that order")
        """
    )
    assert "INSTRUMENTED True" in proc.stdout
    assert "could not instrument" not in proc.stderr, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["imported in that order"]
    assert run.end_time is not None


@pytest.mark.new_repo
def test_kill_switch_creates_nothing(run_py, repo):
    proc = run_py(script=APPS / "rag.py", args=["2"], env={"AIM_LLAMA_ENABLED": "false"})
    assert "DONE" in proc.stdout
    assert run_hashes(repo) == []
    assert not Path(repo).exists()


def test_kill_switch_beats_a_broken_config(run_py, repo):
    proc = run_py(
        script=APPS / "rag.py",
        args=["1"],
        env={"AIM_LLAMA_ENABLED": "0", "AIM_SYSTEM_TRACKING_INTERVAL": "abc"},
    )
    assert proc.stderr.strip() == ""
    assert run_hashes(repo) == []


def test_kill_switch_in_the_toml_file_beats_a_broken_config(run_py, repo, workdir):
    (workdir / "aim_llama.toml").write_text("enabled = false\nqueue_size = 5\n")
    proc = run_py(script=APPS / "rag.py", args=["1"])
    assert "DONE" in proc.stdout
    assert proc.stderr.strip() == ""
    assert run_hashes(repo) == []


LIGHT_APP = """
    import aim_llama.auto, aim_llama
    from llama_index.core.llms import MockLLM
    MockLLM(max_tokens=2).complete("still recorded")
    print("APP RAN", aim_llama.is_instrumented())
"""


@pytest.mark.parametrize(
    ("case", "env", "message"),
    [
        ("name too long", {"AIM_LLAMA_CONFIG": "c" * 300}, "File name too long"),
        ("unknown user", {"AIM_LLAMA_CONFIG": "~nosuchuser-aimllama/x.toml"}, "cannot be found"),
    ],
)
def test_a_config_path_the_system_rejects_is_one_line_and_the_app_runs(run_py, repo, case, env,
                                                                         message):
    proc = run_py(LIGHT_APP, env=env)
    assert "APP RAN False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "AIM_LLAMA_CONFIG" in lines[0], proc.stderr
    assert run_hashes(repo) == []


def test_an_unreadable_pyproject_is_one_warning_and_the_app_is_recorded(workdir, repo):
    import subprocess
    import sys
    import textwrap

    from conftest import clean_env, unprivileged

    (workdir / "pyproject.toml").write_text("[tool.aim_llama]\nqueue_size = 5\n")
    (workdir / "pyproject.toml").chmod(0)
    proc = subprocess.run(unprivileged([sys.executable, "-c", textwrap.dedent(LIGHT_APP)]),
                          cwd=workdir, env=clean_env(AIM_REPO=str(repo)), capture_output=True,
                          text=True, timeout=120)
    assert "APP RAN True" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aim_llama: cannot read "), proc.stderr
    assert "pyproject.toml" in lines[0] and "is not applied" in lines[0]
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["still recorded"]


def _in_a_deleted_directory(workdir, *args: str, **env: str):
    """Run `args` (python and its arguments) in a working directory deleted just before."""
    import subprocess

    from conftest import clean_env

    gone = workdir / "gone"
    gone.mkdir()
    return subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone), *args],
        env=clean_env(**env), capture_output=True, text=True, timeout=120,
    )


def test_an_app_in_a_deleted_working_directory_is_still_recorded(workdir, repo):
    import sys
    import textwrap

    script = workdir / "app.py"
    script.write_text(textwrap.dedent(LIGHT_APP))
    proc = _in_a_deleted_directory(workdir, sys.executable, str(script), AIM_REPO=str(repo))
    assert proc.returncode == 0 and "APP RAN True" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["still recorded"]


def test_a_deleted_working_directory_with_the_default_repo_says_so_at_once(workdir):
    import sys
    import textwrap

    script = workdir / "app.py"
    script.write_text(textwrap.dedent(LIGHT_APP))
    proc = _in_a_deleted_directory(workdir, sys.executable, str(script))
    assert proc.returncode == 0 and "APP RAN False" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aim_llama: invalid setting repo (default): the working directory "
                               "no longer exists"), lines[0]
    assert "set AIM_REPO to an absolute path" in lines[0]
    # strict mode validates at start-up: a program that never uses LlamaIndex still runs there
    proc = _in_a_deleted_directory(workdir, sys.executable, "-c", "import aim_llama.auto; print(1)",
                                   AIM_LLAMA_STRICT="1")
    assert proc.returncode == 0 and proc.stdout == "1\n" and proc.stderr == "", proc.stderr


def test_a_failed_llamaindex_import_that_the_app_retries_is_instrumented(run_py, repo):
    proc = run_py(
        """
        import sys, aim_llama.auto, aim_llama
        sys.modules["llama_index.core.settings"] = None  # the first import fails part-way
        try:
            import llama_index.core
        except ImportError:
            print("FIRST IMPORT FAILED")
        del sys.modules["llama_index.core.settings"]
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("after a retry")
        print("INSTRUMENTED", aim_llama.is_instrumented())
        """
    )
    assert "FIRST IMPORT FAILED" in proc.stdout and "INSTRUMENTED True" in proc.stdout
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["after a retry"]


def test_bad_config_fails_open_with_one_line(run_py, repo):
    proc = run_py(
        script=APPS / "rag.py",
        args=["2", "--exit-code", "3"],
        env={"AIM_SYSTEM_TRACKING_INTERVAL": "abc"},
        check=False,
    )
    assert proc.returncode == 3  # the app's own exit code, unchanged
    assert "DONE" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "aim_llama" in line]
    assert len(lines) == 1, proc.stderr
    assert "AIM_SYSTEM_TRACKING_INTERVAL='abc'" in lines[0]
    assert "Traceback" not in proc.stderr
    assert run_hashes(repo) == []


def test_an_app_that_configured_logging_gets_the_line_once_through_its_own_handler(run_py, repo):
    """The fallback stderr line is for apps with no logging set up; beside the app's handler
    it would be the same message twice."""
    proc = run_py("import logging\n"
                  "logging.basicConfig(format='APP %(levelname)s %(message)s')\n"
                  "import aim_llama.auto\n"
                  "import llama_index.core\n", env={"AIM_LLAMA_QUEUE_SIZE": "5"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("APP WARNING invalid setting queue_size"), lines
    assert run_hashes(repo) == []


def test_bad_toml_key_reported_with_file_and_suggestion(run_py, repo, workdir):
    (workdir / "aim_llama.toml").write_text('experimnet = "x"\n')
    proc = run_py(script=APPS / "rag.py", args=["1"])
    assert "aim_llama.toml: unknown setting 'experimnet'; did you mean 'experiment'?" in proc.stderr
    assert run_hashes(repo) == []


def test_strict_mode_raises_config_error(run_py):
    proc = run_py(
        "import aim_llama.auto\nprint('NOT REACHED')",
        env={"AIM_LLAMA_STRICT": "true", "AIM_LLAMA_QUEUE_SIZE": "-1"},
        check=False,
    )
    assert proc.returncode == 1
    assert "NOT REACHED" not in proc.stdout
    assert "aim_llama.errors.ConfigError: invalid setting queue_size" in proc.stderr


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("aim_llama.toml", "strict = true\nqueue_size = 5\n"),
        ("pyproject.toml", "[tool.mypy]\nstrict = false\n[tool.aim_llama]\nstrict = true\n"
                           "queue_size = 5\n"),
    ],
)
def test_strict_mode_from_a_file_raises_at_the_import_line(run_py, workdir, file, text):
    (workdir / file).write_text(text)
    proc = run_py("import aim_llama.auto\nprint('NOT REACHED')", check=False)
    assert proc.returncode == 1
    assert "NOT REACHED" not in proc.stdout
    assert "aim_llama.errors.ConfigError: invalid setting queue_size" in proc.stderr


def test_strict_mode_is_known_in_every_spelling_when_another_setting_is_bad(run_py):
    proc = run_py(
        """
        import aim_llama
        from llama_index.core import Settings
        for word in ("yes", "TRUE", "on", 1):
            try:
                aim_llama.instrument(strict=word, queue_size=5)
                print("FAILED OPEN", word)
            except aim_llama.ConfigError:
                print("RAISED", word)
        """
    )
    assert proc.stdout.split("\n")[:4] == ["RAISED yes", "RAISED TRUE", "RAISED on", "RAISED 1"]


def test_strict_instrument_kwarg_raises(run_py):
    proc = run_py(
        """
        import aim_llama
        try:
            aim_llama.instrument(strict=True, writer="carrier-pigeon")
        except aim_llama.ConfigError as exc:
            print("CONFIG ERROR:", exc)
        """
    )
    assert "CONFIG ERROR: invalid setting writer (instrument(writer='carrier-pigeon'))" in proc.stdout


def test_no_run_when_llamaindex_is_never_called(run_py, repo):
    proc = run_py("import aim_llama.auto, aim_llama\nfrom llama_index.core import Settings\n"
                  "print('INSTRUMENTED', aim_llama.is_instrumented())")
    assert "INSTRUMENTED True" in proc.stdout  # active, yet nothing to record: no run
    assert run_hashes(repo) == []


def test_a_run_param_aim_cannot_store_is_left_out_and_the_run_recorded(run_py, repo):
    proc = run_py(script=APPS / "rag.py", args=["2"], env={
        "AIM_RUN_PARAMS": json.dumps({"job_id": 123456789012345678901234, "team": "search"})})
    run = only_run(repo)
    assert run.params["team"] == "search" and "job_id" not in run.params
    assert [s for s, _ in run.text("prompt", kind="llm")] == [0, 1]
    warnings = [line for line in proc.stderr.splitlines() if "run parameter" in line]
    assert len(warnings) == 1 and "'job_id'" in warnings[0], proc.stderr


def test_system_params_and_run_params(run_py, repo, workdir):
    import subprocess

    (workdir / "aim_llama.toml").write_text(
        'experiment = "params"\n[run_params]\nteam = "search"\nnested = { depth = 2 }\n'
    )
    git = ["git", "-c", "user.name=Tess Ter", "-c", "user.email=t@example.com"]
    for args in (["init", "-q", "-b", "trunk"], ["commit", "-q", "--allow-empty", "-m", "first"],
                 ["remote", "add", "origin", "https://tess:s3cret@example.com/app.git"]):
        subprocess.run([*git, *args], cwd=workdir, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workdir, check=True,
                          capture_output=True, text=True).stdout.strip()
    run_py(
        script=APPS / "rag.py",
        args=["1"],
        env={"AIM_RUN_PARAMS": json.dumps({"dataset": "faq-v2", "sk-" + "K" * 24: 1}),
             "MY_API_TOKEN": "hunter2",
             "APP_MARKER": "the app's own", "PROXY_URL": "https://p/?k=sk-" + "Q" * 24},
    )
    run = only_run(repo)
    assert run.experiment == "params"
    # env beats the file for run_params as a whole
    assert run.params["dataset"] == "faq-v2" and "team" not in run.params
    assert run.params["[REDACTED]"] == 1 and not any("KKKK" in k for k in run.params)
    system = run.params["__system_params"]
    assert set(system) == {"packages", "env_variables", "git_info", "executable", "arguments"}
    assert "llama-index-core" in system["packages"] and "aim" in system["packages"]
    assert "MY_API_TOKEN" not in system["env_variables"]
    assert system["env_variables"]["AIM_REPO"] == str(repo)
    # the application's environment, not the one aim-llama gives its writer process ...
    assert system["env_variables"]["APP_MARKER"] == "the app's own"
    assert "AIM_LLAMA_ROLE" not in system["env_variables"]
    # ... with secrets redacted in values, not only dropped by name
    assert system["env_variables"]["PROXY_URL"] == "https://p/?k=[REDACTED]"
    assert system["arguments"][0].endswith("rag.py")
    assert run.params["aim_llama"]["role"] == "main"
    # the app's checkout, without the credentials in its remote's address
    git_info = system["git_info"]
    assert git_info["branch"] == "trunk" and git_info["commit"]["hash"] == head
    assert git_info["commit"]["author"] == "Tess Ter"
    assert "s3cret" not in git_info["remote_origin_url"]
    assert git_info["remote_origin_url"].endswith("example.com/app.git")


def test_toml_run_params_when_env_absent(run_py, repo, workdir):
    (workdir / "aim_llama.toml").write_text('[run_params]\nteam = "search"\n')
    run_py(script=APPS / "rag.py", args=["1"], env={"AIM_LOG_SYSTEM_PARAMS": "false"})
    run = only_run(repo)
    assert run.params["team"] == "search"
    assert "__system_params" not in run.params


def test_llm_exception_passes_through_unchanged(run_py, repo):
    proc = run_py(
        """
        import aim_llama.auto
        from typing import Any
        from llama_index.core import Document, Settings, VectorStoreIndex
        from llama_index.core.embeddings import MockEmbedding
        from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
        from llama_index.core.llms.callbacks import llm_completion_callback

        class Exploding(CustomLLM):
            @property
            def metadata(self) -> LLMMetadata:
                return LLMMetadata(model_name="exploding")
            @llm_completion_callback()
            def complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
                raise RuntimeError("model is down")
            @llm_completion_callback()
            def stream_complete(self, prompt: str, formatted: bool = False, **kw: Any):
                raise RuntimeError("model is down")

        Settings.llm = Exploding()
        Settings.embed_model = MockEmbedding(embed_dim=8)
        engine = VectorStoreIndex.from_documents([Document(text="a b c")]).as_query_engine()
        try:
            engine.query("will this work?")
        except Exception as exc:
            print("CAUGHT", type(exc).__name__, exc)
        """
    )
    assert "CAUGHT RuntimeError model is down" in proc.stdout
    run = only_run(repo)
    errors = run.metric("errors", kind="llm")
    assert len(errors) == 1 and errors[0][1] == 1
    assert run.end_time is not None


def test_ignore_lists_are_honored(run_py, repo):
    run_py(
        script=APPS / "rag.py",
        args=["2"],
        env={"AIM_EVENT_ENDS_TO_IGNORE": "LLM", "AIM_EVENT_STARTS_TO_IGNORE": "query"},
    )
    run = only_run(repo)
    names = {name for name, _ in run.sequences()}
    assert "prompt" not in names and "response" not in names
    assert run.text("chunk", kind="chunking")  # other events still recorded
    assert not run.metric("latency_ms", kind="query")  # its start was ignored: no latency
    # either list suppresses a type's data, also where it is recorded at the event's end
    run_py(script=APPS / "rag.py", args=["1"],
           env={"AIM_EVENT_STARTS_TO_IGNORE": "chunking"})
    (second,) = [r for r in read_all(repo) if r.hash != run.hash]
    assert second.text("prompt", kind="llm") and not second.text("chunk", kind="chunking")


def test_contexts_stay_low_cardinality(run_py, repo):
    run_py(
        """
        import aim_llama.auto
        from llama_index.core import Settings
        from llama_index.core.llms import MockLLM
        Settings.llm = MockLLM(max_tokens=2)
        llm = Settings.llm
        for i in range(1000):
            llm.complete(f"prompt number {i}")
        """,
        timeout=240,
    )
    run = only_run(repo)
    prompts = run.text("prompt", kind="llm")
    assert [s for s, _ in prompts] == list(range(1000))
    assert prompts[999][1] == "prompt number 999"
    user_sequences = {seq for seq in run.sequences() if not seq[0].startswith("__")}
    assert len(user_sequences) <= 6, user_sequences
    for _, context in user_sequences:
        assert all(key in {"kind", "model", "source", "tool"} for key, _ in context)


@pytest.mark.parametrize("file", ["aim_llama.toml", "pyproject.toml"])
def test_kill_switch_in_a_file_beats_a_broken_config_in_strict_mode(run_py, repo, workdir, file):
    """`enabled = false` from any source wins, also over strict mode's eager validation."""
    table = "[tool.aim_llama]\n" if file == "pyproject.toml" else ""
    (workdir / file).write_text(f"{table}enabled = false\nflush_timeout = 0\n")
    proc = run_py(script=APPS / "rag.py", args=["1"], env={"AIM_LLAMA_STRICT": "1"})
    assert "DONE" in proc.stdout and proc.stderr.strip() == ""
    assert run_hashes(repo) == []


def test_a_config_file_that_is_a_pipe_is_read_once_and_fully(workdir, repo):
    """`AIM_LLAMA_CONFIG=<(...)`: the switches and the full validation see the same text."""
    import subprocess
    import sys

    from conftest import clean_env

    code = ("import aim_llama.auto, llama_index.core, aim_llama.autoinstrument as a; "
            "s = a._active.settings; print('SETTINGS', s.capture_content, s.redact, s.experiment)")
    proc = subprocess.run(
        ["bash", "-c", f'AIM_LLAMA_CONFIG=<(printf \'capture_content = false\\nredact = '
                       f'["acme-[0-9]+"]\\nexperiment = "piped"\\n\') {sys.executable} -c "{code}"'],
        cwd=workdir, env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
        timeout=60)
    assert "SETTINGS False ['acme-[0-9]+'] piped" in proc.stdout, proc.stderr


def test_a_fifo_nobody_writes_is_one_line_not_a_hang(run_py, workdir):
    os.mkfifo(workdir / "fifo.toml")
    started = time.monotonic()
    proc = run_py(LIGHT_APP, env={"AIM_LLAMA_CONFIG": str(workdir / "fifo.toml")}, timeout=30)
    assert time.monotonic() - started < 15
    assert "APP RAN False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fifo.toml" in lines[0] and "within 2s" in lines[0], proc.stderr


def fifo_opened(fifo: Path):
    """A FIFO at `fifo`, and a function that says whether anyone opened it for reading since
    (a writer waits on it in a thread: its `open` returns only once a reader opened it)."""
    import threading

    os.mkfifo(fifo)
    seen = threading.Event()

    def writer() -> None:
        with open(fifo, "wb"):
            seen.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()

    def opened() -> bool:
        thread.join(0.5)
        was = seen.is_set()
        if not was:  # let the writer go
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            thread.join(5)
            os.close(fd)
        return was

    return opened


def test_fifos_by_the_default_names_are_never_waited_on(run_py, repo, workdir):
    """Every Python start (the start-up hook) would wait on them: aim_llama.toml is an error
    at once, pyproject.toml is skipped (not ours); `aim-llama config` says the same."""
    from test_cli_config import cli

    opened = fifo_opened(workdir / "aim_llama.toml")
    proc = run_py(LIGHT_APP)
    assert not opened() and "APP RAN False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "aim_llama.toml' is a FIFO, but aim-llama reads its settings " \
        "from a TOML file of that name" in lines[0], proc.stderr
    config = cli("config", cwd=workdir)
    assert config.returncode == 1 and lines[0].split(": ", 1)[1].split(" — ")[0] in config.stderr
    (workdir / "aim_llama.toml").unlink()
    opened = fifo_opened(workdir / "pyproject.toml")
    proc = run_py(LIGHT_APP)
    assert not opened(), "pyproject.toml was read"
    assert "APP RAN True" in proc.stdout and proc.stderr.strip() == "", proc.stderr
    (workdir / "pyproject.toml").unlink()
    opened = fifo_opened(workdir / "pyproject.toml")
    assert cli("config", cwd=workdir).returncode == 0 and not opened()


def test_a_broken_pyproject_that_never_mentions_aim_llama_is_not_our_business(run_py, repo,
                                                                             workdir):
    (workdir / "pyproject.toml").write_text('[project]\nname = "x"\nversion = 1.0.0\n')
    proc = run_py(LIGHT_APP)
    assert "APP RAN True" in proc.stdout and proc.stderr.strip() == "", proc.stderr
    # nor Aim's: creating a repo runs its database migration (alembic), which read that file
    # from the working directory, failed with a traceback, and no run was created
    # — Aim's default `.aim` beside that very file (process writer), and the thread writer
    # (whose working directory is the application's: it must not be changed)
    for where, env in [("", {}),
                       ("thread", {"AIM_REPO": str(workdir / "thread"),
                                   "AIM_LLAMA_WRITER": "thread"})]:
        proc = run_py(LIGHT_APP, env=env, use_repo=False)
        assert "APP RAN True" in proc.stdout and proc.stderr.strip() == "", (where, proc.stderr)
        (run,) = read_all(workdir / where)
        assert [t for _, t in run.text("prompt", kind="llm")] == ["still recorded"]
    (workdir / "pyproject.toml").write_text('[tool.aim_llama]\nexperiment = "x"\nversion = 1.0.0\n')
    proc = run_py(LIGHT_APP)
    assert "APP RAN False" in proc.stdout
    assert "pyproject.toml [tool.aim_llama] is not valid TOML" in proc.stderr


def test_aims_migration_resolves_relative_pythonpath_entries_as_before(run_py, workdir):
    """Aim's migration subprocess runs in a directory of its own: a relative PYTHONPATH entry
    (vendored packages, `pip install --target deps`) must still mean the same directory."""
    (workdir / "deps").mkdir()
    (workdir / "deps" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('AIM_RUN_META_DATA_DB_URL'):\n"
        "    open(os.environ['MARKER'], 'w').write('seen')\n")
    marker = workdir / "marker"
    proc = run_py(LIGHT_APP, env={"AIM_REPO": str(workdir / "new"), "PYTHONPATH": "deps",
                                  "MARKER": str(marker)}, use_repo=False)
    assert "APP RAN True" in proc.stdout and proc.stderr.strip() == "", proc.stderr
    assert marker.read_text() == "seen"  # the migration's Python found `deps`
    (run,) = read_all(workdir / "new")
    assert [t for _, t in run.text("prompt", kind="llm")] == ["still recorded"]


def test_a_directory_named_like_the_default_file_blames_itself_not_the_env(run_py, workdir):
    (workdir / "aim_llama.toml").mkdir()
    proc = run_py(LIGHT_APP)
    assert "APP RAN False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a directory, but aim-llama reads its settings from a TOML file" \
        in lines[0], proc.stderr


def test_a_dangling_link_named_like_the_default_file_is_one_line(run_py, workdir):
    (workdir / "aim_llama.toml").symlink_to("moved-away.toml")
    proc = run_py(LIGHT_APP)
    assert "APP RAN False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "aim_llama.toml' is a symlink to 'moved-away.toml', which does " \
        "not exist" in lines[0], proc.stderr


def test_a_relative_repo_in_a_config_file_is_beside_that_file(run_py, repo, workdir):
    (workdir / "cfg").mkdir()
    (workdir / "cfg" / "prod.toml").write_text('repo = "runs"\n')
    (workdir / "elsewhere").mkdir()
    proc = run_py("import os; os.chdir('elsewhere')\n" + textwrap.dedent(LIGHT_APP),
                  env={"AIM_LLAMA_CONFIG": "../cfg/prod.toml"}, use_repo=False)
    assert "APP RAN True" in proc.stdout, proc.stderr
    assert len(run_hashes(workdir / "cfg" / "runs")) == 1  # (../cfg/prod.toml from elsewhere/)
    assert not (workdir / "elsewhere" / "runs").exists()


def test_a_program_that_changes_directory_before_llamaindex_keeps_its_start_directory(
        run_py, workdir):
    # strict is read at `import aim_llama.auto`; the settings when LlamaIndex is imported:
    # both from the directory the program started in, and a relative repo lands there too.
    (workdir / "aim_llama.toml").write_text('experiment = "start-dir"\nrepo = "runs"\n')
    (workdir / "elsewhere").mkdir()
    (workdir / "elsewhere" / "aim_llama.toml").write_text(
        'strict = true\nexperiment = "elsewhere"\nqueue_size = -1\n')
    proc = run_py("""
        import os, aim_llama.auto, aim_llama
        os.chdir("elsewhere")
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("recorded")
        print("APP RAN", aim_llama.is_instrumented())
    """, use_repo=False, env={"AIM_REPO": ""})
    assert "APP RAN True" in proc.stdout, proc.stderr
    assert "aim_llama" not in proc.stderr, proc.stderr
    runs = read_all(workdir / "runs")
    assert [run.experiment for run in runs] == ["start-dir"]
    assert not (workdir / "elsewhere" / "runs").exists()

    # ... and a relative AIM_REPO / AIM_LLAMA_CONFIG too
    (workdir / "cfg.toml").write_text('experiment = "named"\n')
    proc = run_py("""
        import os, aim_llama.auto, aim_llama
        os.chdir("elsewhere")
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("recorded")
        print("APP RAN", aim_llama.is_instrumented())
    """, use_repo=False, env={"AIM_REPO": "envruns", "AIM_LLAMA_CONFIG": "cfg.toml"})
    assert "APP RAN True" in proc.stdout, proc.stderr
    assert [run.experiment for run in read_all(workdir / "envruns")] == ["named"]
    assert not (workdir / "elsewhere" / "envruns").exists()


INSTRUMENT_LATE = """
    import sys, aim_llama.auto, aim_llama
    from llama_index.core.llms import MockLLM
    if sys.argv[1] == "late":
        MockLLM(max_tokens=2).complete("recorded before instrument()")
    print("RESULT", aim_llama.instrument(repo=sys.argv[2], experiment="chosen"))
    import aim_llama.autoinstrument as a
    print("ACTIVE", a._active.settings.repo, a._active.settings.experiment)
    MockLLM(max_tokens=2).complete("after")
"""


def test_instrument_settings_after_auto_activation_take_over_or_are_reported(run_py, repo,
                                                                             workdir):
    """The launcher or `import aim_llama.auto` activated first: `instrument(**settings)` still
    applies when nothing was recorded yet; later it is one warning (strict: an error), never
    silently ignored, and never a run split in two."""
    other = workdir / "other-repo"
    proc = run_py(INSTRUMENT_LATE, args=["early", str(other)])
    assert "RESULT True" in proc.stdout and f"ACTIVE {other} chosen" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr
    assert run_hashes(repo) == [] and len(run_hashes(other)) == 1
    assert read_all(other)[0].experiment == "chosen"

    proc = run_py(INSTRUMENT_LATE, args=["late", str(other)])
    assert "RESULT True" in proc.stdout and f"ACTIVE {repo} None" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "came after aim-llama had started recording" in lines[0] \
        and "experiment, repo stay as they were" in lines[0], proc.stderr
    assert len(run_hashes(repo)) == 1

    proc = run_py(INSTRUMENT_LATE, args=["late", str(other)], env={"AIM_LLAMA_STRICT": "1"},
                  check=False)
    assert proc.returncode == 1 and "ConfigError: instrument(experiment=..., repo=...) came after" \
        in proc.stderr


def test_an_invalid_instrument_call_after_activation_says_recording_continues(run_py, repo):
    """It said "running without Aim instrumentation" while the earlier activation went on
    recording: the message now says what happens."""
    proc = run_py(
        "import aim_llama, aim_llama.auto\n"
        "from llama_index.core.llms import MockLLM\n"
        "MockLLM(max_tokens=2).complete('a')\n"
        "print('RESULT', aim_llama.instrument(queue_size=5))\n"
        "MockLLM(max_tokens=2).complete('b')\n")
    assert "RESULT True" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "queue_size" in lines[0] and lines[0].endswith(
        "— instrument() ignored; recording continues with the earlier settings"), proc.stderr
    assert "running without" not in proc.stderr
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["a", "b"]


def test_an_invalid_instrument_call_in_strict_mode_raises_and_keeps_what_was_recorded(
        run_py, repo):
    proc = run_py(
        "import aim_llama, aim_llama.auto\n"
        "from llama_index.core.llms import MockLLM\n"
        "MockLLM(max_tokens=2).complete('a')\n"
        "aim_llama.instrument(queue_size=5)\n"
        "print('NOT REACHED')\n", env={"AIM_LLAMA_STRICT": "1"}, check=False)
    assert proc.returncode == 1 and "NOT REACHED" not in proc.stdout, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "aim_llama.errors.ConfigError: invalid setting queue_size (instrument(queue_size=5))"
    ), proc.stderr
    assert [t for _, t in only_run(repo).text("prompt", kind="llm")] == ["a"]


def test_instrument_enabled_false_wins_over_a_broken_configuration(run_py, repo):
    """The kill switch from any source, here the keyword, wins even over an invalid setting
    elsewhere, also in strict mode: nothing said, nothing raised, nothing recorded."""
    for strict in ("0", "1"):
        proc = run_py("import aim_llama\n"
                      "print('RESULT', aim_llama.instrument(enabled=False))\n"
                      "from llama_index.core.llms import MockLLM\n"
                      "MockLLM(max_tokens=2).complete('a')\n"
                      "print('ACTIVE', aim_llama.is_instrumented())\n",
                      env={"AIM_LLAMA_QUEUE_SIZE": "5", "AIM_LLAMA_STRICT": strict})
        assert "RESULT False" in proc.stdout and "ACTIVE False" in proc.stdout, proc.stderr
        assert proc.stderr.strip() == "", proc.stderr
    assert run_hashes(repo) == []


def test_instrument_accepts_a_path_and_rejects_non_utf8_names(run_py, repo, workdir):
    proc = run_py("import pathlib, llama_index.core, aim_llama\n"
                  "from llama_index.core.llms import MockLLM\n"
                  f"print('RESULT', aim_llama.instrument(repo=pathlib.Path({str(workdir / 'p')!r})))\n"
                  "MockLLM(max_tokens=2).complete('hi')\n")
    assert "RESULT True" in proc.stdout, proc.stderr
    assert len(run_hashes(workdir / "p")) == 1 and run_hashes(repo) == []  # the path given
    proc = run_py(LIGHT_APP, env={"AIM_EXPERIMENT": "exp\udcff"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "APP RAN False" in proc.stdout
    assert len(lines) == 1 and "invalid setting experiment (env AIM_EXPERIMENT=" in lines[0] \
        and "not UTF-8" in lines[0], proc.stderr


@pytest.mark.parametrize("how", ["exec", "spawn", "env"])
def test_a_piped_config_reaches_the_launched_program_and_its_python_children(workdir, repo, how):
    """`aim-llama run --config <(...)` (or `AIM_LLAMA_CONFIG=<(...)` beside a launcher that
    reads it): the launcher reads the pipe, so the program, and the Python child it starts
    (started with close_fds: the pipe is gone there), get its text from the environment;
    before, both found the pipe empty and ran silently with the defaults."""
    import subprocess
    import sys

    from conftest import clean_env

    (workdir / "child.py").write_text(
        "from llama_index.core.llms import MockLLM\nMockLLM(max_tokens=2).complete('child')\n")
    (workdir / "parent.py").write_text(
        "import subprocess, sys\nfrom llama_index.core.llms import MockLLM\n"
        "MockLLM(max_tokens=2).complete('parent')\n"
        "subprocess.run([sys.executable, 'child.py'], check=True)\nprint('PARENT DONE')\n")
    pipe = "<(printf 'experiment = \"piped\"\\nqueue_size = 700\\n')"
    launcher = f"{sys.executable} -m aim_llama run"
    command = {
        "exec": f"{launcher} --config {pipe} -- {sys.executable} parent.py",
        "spawn": f"{launcher} --spawn --config {pipe} -- {sys.executable} parent.py",
        "env": f"AIM_LLAMA_CONFIG={pipe} {launcher} -- {sys.executable} parent.py",
    }[how]
    proc = subprocess.run(["bash", "-c", command], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "PARENT DONE" in proc.stdout, proc.stderr
    assert "aim_llama" not in proc.stderr, proc.stderr
    runs = read_all(repo, with_texts=False)
    assert len(runs) == 2
    assert sorted(run.experiment for run in runs) == ["piped", "piped"]
    assert all(run.end_time is not None and not run.active for run in runs)
    # the piped text is passed on, never recorded (a piped config is often secret)
    assert all("AIM_LLAMA_CONFIG_TEXT" not in run.params["__system_params"]["env_variables"]
               for run in runs)


def test_a_nested_piped_config_is_read_not_taken_for_the_outer_one(workdir, repo):
    """bash gives both pipes the same name (/dev/fd/63): the inner program reads its own."""
    import subprocess
    import sys

    from conftest import clean_env

    (workdir / "inner.py").write_text("import aim_llama.auto\n"
                                      "from llama_index.core.llms import MockLLM\n"
                                      "MockLLM(max_tokens=2).complete('inner')\n")
    (workdir / "inner.sh").write_text(
        "AIM_LLAMA_CONFIG=<(printf 'experiment = \"inner\"\\n') \"$1\" inner.py\n")
    (workdir / "outer.py").write_text(
        "import subprocess, sys\nimport aim_llama.auto\n"
        "from llama_index.core.llms import MockLLM\n"
        "MockLLM(max_tokens=2).complete('outer')\n"
        "subprocess.run(['bash', 'inner.sh', sys.executable], check=True)\n")
    command = f"AIM_LLAMA_CONFIG=<(printf 'experiment = \"outer\"\\n') {sys.executable} outer.py"
    proc = subprocess.run(["bash", "-c", command], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    experiments = {r.text("prompt", kind="llm")[0][1]: r.experiment
                   for r in read_all(repo)}
    assert experiments == {"outer": "outer", "inner": "inner"}, (experiments, proc.stderr)


def test_an_exec_that_cannot_wait_for_the_writer_says_what_it_loses(run_py, repo, workdir):
    """An exec whose flush ran out of time lost what was still queued without a word."""
    (workdir / "burst.py").write_text(textwrap.dedent("""
        import os, signal, sys, time
        import aim_llama, aim_llama.auto
        from aim_llama import autoinstrument
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=3)
        for i in range(100):
            llm.complete(f"q{i}")
        assert aim_llama.flush(60)
        writer = autoinstrument._active.writer._backend.proc.pid
        os.kill(writer, signal.SIGSTOP)  # a writer that cannot keep up: its pipe fills
        for i in range(100, 1000):
            llm.complete(f"q{i} " + "many words in a long prompt " * 20)
        os.environ["PATH"] = os.pathsep.join(
            [f"/nonexistent-aim-llama-{i}" for i in range(6)] + ["/bin", "/usr/bin"])
        start = repr(time.monotonic())
        os.execvp("python3", ["python3", "-c", (  # it lets the writer go on
            f"import os, time; print('EXEC AFTER', time.monotonic() - {start}); "
            f"os.kill({writer}, {int(signal.SIGCONT)})")])
        """))
    proc = run_py(script=workdir / "burst.py", env={"AIM_LLAMA_FLUSH_TIMEOUT": "0.5"})
    waited = float(proc.stdout.split("EXEC AFTER")[1])
    said = re.findall(r"exec: the Aim writer did not store everything within the flush "
                      r"timeout \(0.5s, AIM_LLAMA_FLUSH_TIMEOUT\): up to (\d+) records",
                      proc.stderr)
    assert said and int(said[0]) > 0, proc.stderr
    # each of the 7 attempts (6 missing PATH entries, then python3) waits up to the timeout,
    # not more (README, known issues: each attempt is an exec of its own)
    assert 7 * 0.5 - 0.1 <= waited < 7 * 0.5 + 1.5, (waited, proc.stderr)
    deadline = time.monotonic() + 60  # the writer process goes on storing after the exec
    while True:
        runs = read_all(repo, with_texts=False)
        if (runs and not runs[0].active) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    run = only_run(repo)
    assert 100 <= len(run.text("prompt", kind="llm")) < 1000
    assert run.end_time is not None and not run.active


def test_exec_stores_and_finalizes_the_run_first(run_py, repo, workdir):
    """`os.exec*` replaces the process without atexit: the run is finalized first, with every
    record (before, the records still queued were lost without a word)."""
    (workdir / "stages.py").write_text(textwrap.dedent("""
        import os, sys
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=3)
        if len(sys.argv) == 1:
            for i in range(15):
                llm.complete(f"before exec {i}")
            try:  # a failed exec leaves the run recording
                os.execvp("no-such-program-aim-llama", ["no-such-program-aim-llama"])
            except FileNotFoundError:
                pass
            for i in range(15, 30):
                llm.complete(f"before exec {i}")
            os.execv(sys.executable, [sys.executable, __file__, "second"])
        llm.complete("after exec")
        print("SECOND STAGE DONE", flush=True)
        """))
    proc = run_py(script=workdir / "stages.py")
    assert "SECOND STAGE DONE" in proc.stdout, proc.stderr
    assert "not stored" not in proc.stderr, proc.stderr
    runs = {len(r.text("prompt", kind="llm")): r for r in read_all(repo)}
    assert sorted(runs) == [1, 30]
    stored = [t for _, t in runs[30].text("prompt", kind="llm")]
    assert stored == [f"before exec {i}" for i in range(30)]
    assert all(r.end_time is not None and not r.active for r in runs.values())
