"""The example apps, run the way the README tells a newcomer to, and read back from the repo."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import ROOT, only_run
from test_launcher import launch

EXAMPLES = ROOT / "examples"


def test_the_readmes_first_command_records_the_rag_example(workdir: Path, repo: Path) -> None:
    proc = launch(["--", sys.executable, str(EXAMPLES / "rag_app.py")], workdir, repo)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.count("Q: ") == 4
    run = only_run(repo)
    assert run.end_time is not None and not run.active
    questions = [t for _, t in run.text("question", kind="query")]
    assert questions == ["What is Aim?", "Where is the Eiffel Tower?",
                         "What does a vector store index do?", "Where does the Rhine flow?"]
    assert [s for s, _ in run.text("answer", kind="query")] == [0, 1, 2, 3]
    assert len(run.metric("latency_ms", kind="query")) == 4
    assert len(run.text("prompt", kind="llm")) == 4
    assert all(v == 2 for _, v in run.metric("retrieved_nodes", kind="retrieve",
                                                 retriever="VectorIndexRetriever"))
    assert "Eiffel Tower" in run.text("retrieved", kind="retrieve",
                                      retriever="VectorIndexRetriever")[1][1]


def test_the_agent_example_records_its_tools_steps_and_the_failing_tool(
        workdir: Path, repo: Path) -> None:
    proc = launch(["--", sys.executable, str(EXAMPLES / "agent_app.py")], workdir, repo)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert "A: The tool said: no capital known for Atlantis" in proc.stdout
    run = only_run(repo)
    assert run.end_time is not None and not run.active
    answers = [t for _, t in run.text("answer", kind="agent")]
    assert answers == ["The tool said: 42.0", "The tool said: Tokyo",
                       "The tool said: no capital known for Atlantis",
                       "The tool said: The staging server is rebuilt every night at 02:00 UTC."]
    assert [t for _, t in run.text("tool_call", kind="tool", tool="multiply")] == \
        ["multiply(a=6.0, b=7.0)\n-> 42.0"]
    assert [t for _, t in run.text("tool_call", kind="tool", tool="capital")] == [
        "capital(country=Japan)\n-> Tokyo",
        "capital(country=Atlantis)\n-> error: ValueError: no capital known for Atlantis"]
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    # the notes tool is a query engine: its retrieval and its own LLM call are recorded too
    assert len(run.metric("latency_ms", kind="retrieve", retriever="VectorIndexRetriever")) == 1
    assert len(run.metric("latency_ms", kind="llm")) == 9  # 2 per question + the notes engine's
    assert len(run.metric("latency_ms", kind="agent_step", step="call_tool")) == 4
    traces = [t for _, t in run.text("trace", kind="agent")]
    assert len(traces) == 4
    assert "FunctionTool.acall" in traces[2] and "error ValueError tool=capital" in traces[2]
