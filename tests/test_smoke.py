"""The spine end to end: `import aim_llama.auto` + AIM_REPO → a finished run with prompts and responses."""

import pytest

from aimread import read_all
from conftest import APPS, only_run

RETRIEVE = {"kind": "retrieve", "retriever": "VectorIndexRetriever"}


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
        # a private key printed as it is (lines were redacted one by one: its body was kept)
        print("-----BEGIN RSA PRIVATE KEY-----\\nMIIEpQIBAAKCAQEA1111" + "\\nMIIEpQIBAAKCAQEA2222"
              + "\\n-----END RSA PRIVATE KEY----- after", flush=True)
        # escapes ending in a letter right before a key hid it from a word boundary
        print("env: A=1\\\\nKEY=sk-" + "QRSTUVWXYZabcdefghij", "\\x1b[31msk-" + "klmnopqrstuvwxyz0123"
              + "\\x1b[0m", flush=True)
        print("after the key", flush=True)
        # a key kept on one long line of base64 (from an env var, a secret manager)
        print("-----BEGIN PRIVATE KEY-----\\n" + "MIIEvQIBADANBgkqhkiG9w0B" * 40
              + "\\n-----END PRIVATE KEY-----", flush=True)
        import sys
        sys.stdout.write("windows line\\r\\n")  # (CRLF: stored as the line, not empty)
        print("密钥是sk-" + "proj-" + "CJKCJKCJKabcdefghij", flush=True)
        # a key's first line alone (a truncated key), then ordinary lines: shown again
        print("got: -----BEGIN RSA PRIVATE KEY-----", flush=True)
        print("ValueError: not a key", flush=True)
        print("still shown", flush=True)
        """,
        env={"AIM_LLAMA_REDACT": r"\d{3}-\d{2}-\d{4}"},
    )
    lines = terminal_lines(repo, only_run(repo).hash)
    assert "debug: key [REDACTED] ssn [REDACTED]" in lines
    assert "plain line" in lines and "after the key" in lines
    assert not any("ABCDEFGH" in line or "6789" in line for line in lines)
    assert not any("MIIE" in line or "QRSTUV" in line or "klmnop" in line or "CJKCJK" in line
                   for line in lines), lines
    assert "windows line" in lines and "密钥是[REDACTED]" in lines, lines
    assert "[REDACTED] after" in lines, lines
    assert lines[-3:] == ["got: [REDACTED]", "ValueError: not a key", "still shown"], lines


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


def test_terminal_logs_survive_a_notebook_putting_its_own_write_back(run_py, repo):
    """IPython replaces `sys.stdout.write` for each cell and puts back its saved copy after
    it, which took aim-llama's copy away: only the activating cell reached the Logs. A new
    request wraps it again; nothing is copied twice."""
    from aimread import terminal_lines

    run_py(
        """
        import sys
        import aim_llama.auto

        def cell(n):  # as IPython runs a cell: its own write in place, then its copy back
            saved = sys.stdout.write
            sys.stdout.write = lambda data, _w=saved: _w(data)
            try:
                from llama_index.core.llms import MockLLM  # (activates in the first cell)

                MockLLM(max_tokens=2).complete(f"cell {n}")
                print(f"printed in cell {n}", flush=True)
            finally:
                sys.stdout.write = saved

        for n in range(3):
            cell(n)
        """,
    )
    lines = terminal_lines(repo, only_run(repo).hash)
    assert [line for line in lines if line.startswith("printed")] == [
        "printed in cell 0", "printed in cell 1", "printed in cell 2"], lines


def test_terminal_logs_copy_a_line_once_after_reactivation_under_the_apps_own_tee(run_py,
                                                                                  repo):
    """The application's own tee on top of aim-llama's keeps aim-llama's wrapper in its chain
    after `uninstrument()`: it must pass writes through, not copy them a second time."""
    from aimread import terminal_lines

    run_py(
        """
        import sys
        import aim_llama
        from llama_index.core.llms import MockLLM

        aim_llama.instrument()
        MockLLM(max_tokens=2).complete("first")
        below = sys.stdout.write  # aim-llama's
        sys.stdout.write = lambda data, _w=below: _w(data)  # the app's own tee, on top
        aim_llama.uninstrument()
        aim_llama.instrument()
        MockLLM(max_tokens=2).complete("second")
        print("said once", flush=True)
        """,
    )
    runs = read_all(repo)
    lines = [line for run in runs for line in terminal_lines(repo, run.hash)]
    assert lines.count("said once") == 1, lines


def test_system_metrics_describe_the_application_process(run_py, repo):
    """On by default (every second): CPU and memory of the application's process, not of the
    writer process that stores them. The app holds ~1 GB; the writer holds ~0.2 GB."""
    import psutil

    run_py(
        """
        import time
        import aim_llama.auto
        import aim_llama
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=2).complete("hi")
        aim_llama.flush(60)  # the writer's run is open (slow to start on a loaded machine)
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


def test_unusual_values_from_the_app_are_recorded_not_lost(run_py, repo):
    """Values a real app produces, each of which once cost records with the writer process: a
    query that is the app's own `str` subclass (the writer lacks its class: recording ended,
    silently), a provider token count beyond 64 bits (the repo was taken for unwritable), zero
    embeddings (NaN scores: an error line per retrieval) and a 30 000-character question
    (it filled the `retrieved` text, leaving no node in it)."""
    proc = run_py(
        """
        import aim_llama.auto, aim_llama
        from llama_index.core import Document, Settings, VectorStoreIndex
        from llama_index.core.embeddings import MockEmbedding
        from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata, MockLLM
        from llama_index.core.llms.callbacks import llm_completion_callback

        class Question(str):
            pass

        class ZeroEmbedding(MockEmbedding):
            def _get_vector(self):
                return [0.0] * self.embed_dim

        class HugeUsage(CustomLLM):
            @property
            def metadata(self):
                return LLMMetadata(model_name="huge-usage")

            @llm_completion_callback()
            def complete(self, prompt, formatted=False, **kwargs):
                usage = {"prompt_tokens": 2**64, "completion_tokens": 2}
                return CompletionResponse(text="ok", raw={"usage": usage})

            @llm_completion_callback()
            def stream_complete(self, prompt, formatted=False, **kwargs):
                raise NotImplementedError

        HugeUsage().complete("first")
        Settings.llm = MockLLM(max_tokens=4)
        Settings.embed_model = ZeroEmbedding(embed_dim=4)
        docs = [Document(text=f"document {i}") for i in range(3)]
        index = VectorStoreIndex.from_documents(docs)
        engine = index.as_query_engine(similarity_top_k=2)
        for i in range(3):
            engine.query(Question(f"question {i}"))
        index.as_retriever(similarity_top_k=2).retrieve("long " * 6000)

        from llama_index.core.retrievers import BaseRetriever
        from llama_index.core.schema import NodeWithScore, TextNode

        class Fixed(BaseRetriever):  # scores numpy cannot cut into 64 bins
            def __init__(self, scores):
                super().__init__()
                self.scores = scores

            def _retrieve(self, query_bundle):
                return [NodeWithScore(node=TextNode(text=f"n{i}"), score=s)
                        for i, s in enumerate(self.scores)]

        for scores in ([0.42426406871192857, 0.42426406871192845],  # near-duplicate chunks
                       [1e16, 1e16], [-1e308, 1e308]):
            Fixed(scores).retrieve("q")
        print("FLUSHED", aim_llama.flush(30))
        """
    )
    assert "FLUSHED True" in proc.stdout, proc.stderr
    assert "aim_llama" not in proc.stderr, proc.stderr
    run = only_run(repo)
    questions = [text for _, text in run.text("question", kind="query")]
    assert questions == ["question 0", "question 1", "question 2"]
    assert len(run.metric("latency_ms", kind="query")) == 3
    assert len(run.metric("retrieved_nodes", **RETRIEVE)) == 4
    assert run.metric("top_score", **RETRIEVE) == []  # NaN is no score
    fixed = {"kind": "retrieve", "retriever": "Fixed"}
    assert [v for _, v in run.metric("top_score", **fixed)] == [0.42426406871192857, 1e16, 1e308]
    # each score list is one distribution, none lost (numpy could not cut them into 64 bins)
    assert [d for _, d in run.distribution("retrieval_scores", **fixed)] == [
        (2, (0.42426406871192845, 0.42426406871192857)), (2, (1e16, 1e16)), (2, (-1e308, 1e308))]
    retrieved = [text for _, text in run.text("retrieved", **RETRIEVE)]
    first, *nodes = retrieved[3].splitlines()
    assert first.startswith("query: long long") and first.endswith("…") and len(first) < 400
    assert [line[:3] for line in nodes] == ["1. ", "2. "]
    tokens = {ctx: values for (name, ctx), values in run.metrics.items() if name == "prompt_tokens"}
    assert tokens, run.metrics.keys()  # the huge count is not taken; the call still has its tokens
    assert all(0 <= v < 2**63 for values in tokens.values() for _, v in values), tokens
