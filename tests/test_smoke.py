"""The spine end to end: `import aim_llama.auto` + AIM_REPO → a finished run with prompts and responses."""

import pytest

from conftest import APPS, only_run


@pytest.mark.new_repo
def test_auto_import_records_prompts_and_responses(run_py, repo):
    proc = run_py(script=APPS / "rag.py", args=["3"], env={"AIM_EXPERIMENT": "smoke"})
    assert "DONE" in proc.stdout
    assert proc.stderr.strip() == ""  # a clean exit: no warnings, no tracebacks from Aim's exit hooks
    run = only_run(repo)
    assert run.experiment == "smoke"
    assert run.end_time is not None and not run.active
    prompts = run.text("prompt", kind="llm")
    responses = run.text("response", kind="llm")
    assert [s for s, _ in prompts] == [0, 1, 2]
    assert [s for s, _ in responses] == [0, 1, 2]
    assert "question 1: what about topic 1?" in prompts[1][1]
    assert all(text.strip() for _, text in responses)


def test_terminal_output_is_stored_with_secrets_redacted(run_py, repo):
    """The app's stdout reaches the run's terminal logs, redacted like every other text."""
    from aimread import terminal_lines

    run_py(
        """
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("hi")
        print("debug: key sk-" + "ABCDEFGHIJKLMNOPQRSTUVWX" + " ssn 123-45-" + "6789", flush=True)
        print("plain line", flush=True)
        """,
        env={"AIM_LLAMA_REDACT": r"\d{3}-\d{2}-\d{4}"},
    )
    lines = terminal_lines(repo, only_run(repo).hash)
    assert "debug: key [REDACTED] ssn [REDACTED]" in lines
    assert "plain line" in lines
    assert not any("ABCDEFGH" in line or "6789" in line for line in lines)


def test_terminal_logs_keep_stderr_progress_lines_and_an_unfinished_last_line(run_py, repo):
    """Both streams are copied; a `\\r`-rewritten progress line is stored as it ended; the last
    line, written without a newline just before exit, is not lost."""
    from aimread import terminal_lines

    run_py(
        """
        import sys
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("hi")
        print("to stderr", file=sys.stderr, flush=True)
        sys.stdout.write("progress 10%\\rprogress 100%\\n")
        sys.stdout.write("last words, no newline")
        sys.stdout.flush()
        """,
    )
    lines = terminal_lines(repo, only_run(repo).hash)
    assert "to stderr" in lines
    assert "progress 100%" in lines and not any("10%" in line for line in lines)
    assert lines[-1] == "last words, no newline"


def test_system_metrics_describe_the_application_process(run_py, repo):
    """On by default (every second): CPU and memory of the application's process, not of the
    writer process that stores them. The app holds ~1 GB; the writer holds ~0.2 GB."""
    import psutil

    run_py(
        """
        import time
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("hi")
        ballast = b"x" * 1_000_000_000
        time.sleep(3.5)
        """,
        env={"AIM_SYSTEM_TRACKING_INTERVAL": "1"},
    )
    run = only_run(repo)
    names = {name for name, _ in run.metrics}
    assert {"__system__cpu", "__system__p_memory_percent"} <= names, names
    memory = [v for _, v in run.metric("__system__p_memory_percent")]
    assert len(memory) >= 2
    held = max(memory) / 100 * psutil.virtual_memory().total
    assert held > 0.9e9, held


def test_the_app_never_waits_for_its_writer_to_start(run_py, repo, tmp_path):
    """The writer process starts at the first record and needs Python, Aim and the run before it
    stores anything; here its start is made 6 s slower (a `sitecustomize` it inherits sleeps
    when it is the writer). The application's calls do not wait for it; at exit everything is
    stored within the flush timeout."""
    slow = tmp_path / "slowwriter"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('AIM_LLAMA_ROLE') == 'writer':\n    time.sleep(6)\n")
    proc = run_py(
        """
        import time
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=3)
        llm.complete("warm up LlamaIndex's lazy imports")
        t0 = time.perf_counter()
        for i in range(20):
            llm.complete(f"call {i}")
        print(f"CALLS TOOK {time.perf_counter() - t0:.3f}", flush=True)
        """,
        env={"PYTHONPATH": str(slow), "AIM_LLAMA_FLUSH_TIMEOUT": "30"},
    )
    took = float(proc.stdout.split("CALLS TOOK ")[1].split()[0])
    assert took < 3.0, took  # a writer that made the app wait would cost it 6 s or more
    run = only_run(repo)
    assert len(run.text("prompt", kind="llm")) == 21
    assert run.end_time is not None and not run.active
