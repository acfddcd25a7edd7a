"""Fork safety: forked and spawned children each get their own finalized run; the parent's is untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aimread import RunData, read_all
from conftest import clean_env

AIM_LLAMA = str(Path(sys.executable).with_name("aim-llama"))


def prompts(run: RunData) -> list[str]:
    return [text for _, text in run.text("prompt", kind="llm")]


def run_app(
    workdir: Path, repo: Path, code: str, launcher: bool, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    script = workdir / "app.py"
    script.write_text(textwrap.dedent(code))
    cmd = [sys.executable, str(script), *args]
    if launcher:
        cmd = [AIM_LLAMA, "run", "--", *cmd]
    proc = subprocess.run(
        cmd, cwd=workdir, env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
        timeout=150,  # a hang in a child (the failure this guards against) fails the test
    )
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def value_of(stdout: str, key: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(key + " ")]
    return line.split(" ", 1)[1]


def assert_finalized(runs: list[RunData]) -> None:
    for run in runs:
        assert run.end_time is not None and not run.active, run.hash


def test_os_fork_child_gets_its_own_run_and_parent_run_is_untouched(workdir, repo):
    proc = run_app(workdir, repo, """
        import os, sys
        import aim_llama.auto
        import aim_llama
        from llama_index.core.llms import MockLLM
        from llama_index.core.tools import FunctionTool
        tool = FunctionTool.from_defaults(lambda x: x, name="echo", description="echo")
        llm = MockLLM(max_tokens=3)
        llm.complete("parent before fork")
        tool.call(x="parent")
        print("PARENT", os.getpid(), aim_llama.current_run_hash(), flush=True)
        child = os.fork()
        if child == 0:
            llm.complete("child call 0")
            llm.complete("child call 1")
            tool.call(x="child")
            sys.exit(0)
        quiet = os.fork()
        if quiet == 0:
            print("a child that records nothing", flush=True)
            sys.exit(0)
        assert os.waitpid(child, 0)[1] == 0 and os.waitpid(quiet, 0)[1] == 0
        llm.complete("parent after fork")
        print("CHILD", child, flush=True)
    """, launcher=False)
    parent_pid, parent_hash = value_of(proc.stdout, "PARENT").split()
    child_pid = int(value_of(proc.stdout, "CHILD"))
    runs = {r.params["aim_llama"]["pid"]: r for r in read_all(repo)}
    assert set(runs) == {int(parent_pid), child_pid}  # the quiet child left no run
    parent, child = runs[int(parent_pid)], runs[child_pid]
    assert parent.hash == parent_hash
    assert prompts(parent) == ["parent before fork", "parent after fork"]
    assert [s for s, _ in parent.text("prompt", kind="llm")] == [0, 1]
    assert parent.params["aim_llama"]["role"] == "main"
    assert prompts(child) == ["child call 0", "child call 1"]
    assert [s for s, _ in child.text("prompt", kind="llm")] == [0, 1]  # numbered from 0 again
    assert [s for s, _ in child.text("tool_call", kind="tool", tool="echo")] == [0]  # (tools too)
    assert child.params["aim_llama"]["role"] == "fork-child"
    assert_finalized([parent, child])


POOL_APP = """
    import multiprocessing as mp, os, sys
    from llama_index.core.llms import MockLLM

    def work(i):
        MockLLM(max_tokens=3).complete(f"task {i}")
        return os.getpid()

    if __name__ == "__main__":
        MockLLM(max_tokens=3).complete("parent call")
        ctx = mp.get_context("{context}")
        pids = set()
        pool = ctx.Pool(2)  # workers leave through os._exit after close()/join()
        pids.update(pool.map(work, range(0, 4), chunksize=1))
        pool.close()
        pool.join()
        if "--terminate" in sys.argv:
            with ctx.Pool(1) as pool:  # __exit__ calls terminate(): the worker gets SIGTERM
                pids.update(pool.map(work, range(4, 6), chunksize=1))
        print("PARENT", os.getpid(), flush=True)
        print("TASKS", 6 if "--terminate" in sys.argv else 4, flush=True)
        print("WORKERS", " ".join(map(str, sorted(pids))), flush=True)
"""


def check_pool_runs(stdout: str, repo: Path, role: str) -> None:
    parent_pid = int(value_of(stdout, "PARENT"))
    workers = {int(p) for p in value_of(stdout, "WORKERS").split()}
    runs = read_all(repo)
    by_pid = {r.params["aim_llama"]["pid"]: r for r in runs}
    assert len(by_pid) == len(runs)  # one run per process
    assert set(by_pid) == workers | {parent_pid}  # every worker that recorded has its own run
    assert prompts(by_pid[parent_pid]) == ["parent call"]
    assert by_pid[parent_pid].params["aim_llama"]["role"] == "main"
    recorded: list[str] = []
    for pid in workers:
        run = by_pid[pid]
        assert run.params["aim_llama"]["role"] == role
        assert [s for s, _ in run.text("prompt", kind="llm")] == list(range(len(prompts(run))))
        recorded += prompts(run)
    tasks = int(value_of(stdout, "TASKS"))
    # Every call exactly once, including the workers stopped by Pool.terminate(): their SIGTERM
    # can land while multiprocessing's own exit hook is flushing the writer; the signal then
    # waits for that flush instead of killing the process halfway (a regression test for that).
    assert sorted(recorded) == sorted(f"task {i}" for i in range(tasks))
    assert_finalized(runs)


@pytest.mark.new_repo
def test_fork_pool_under_the_launcher_gives_each_worker_its_own_finalized_run(workdir, repo):
    # A fresh repo on purpose: the workers' writers then race to create it (see aimrun).
    proc = run_app(workdir, repo, POOL_APP.replace("{context}", "fork"), launcher=True,
                   args=("--terminate",))
    check_pool_runs(proc.stdout, repo, "fork-child")


def test_spawn_pool_under_the_launcher_activates_the_children(workdir, repo):
    proc = run_app(workdir, repo, POOL_APP.replace("{context}", "spawn"), launcher=True)
    check_pool_runs(proc.stdout, repo, "spawn-child")


def test_forkserver_pool_under_the_launcher_keeps_every_record(workdir, repo):
    """Forkserver workers activate while their main module is prepared, and leave through
    os._exit: each has its own finalized run with every call, and says `spawn-child`."""
    proc = run_app(workdir, repo, POOL_APP.replace("{context}", "forkserver"), launcher=True)
    check_pool_runs(proc.stdout, repo, "spawn-child")


def test_a_program_a_spawn_worker_starts_is_no_spawn_child_itself(workdir, repo):
    """The worker's role comes from its own command line: a plain Python program it runs
    (propagated by the launcher) records as `main`, not as a `spawn-child`."""
    proc = run_app(workdir, repo, """
        import multiprocessing as mp, os, subprocess, sys
        from llama_index.core.llms import MockLLM

        GRANDCHILD = ("import os; from llama_index.core.llms import MockLLM; "
                      "MockLLM(max_tokens=2).complete('grandchild'); print('GRANDCHILD', os.getpid())")

        def work(_):
            MockLLM(max_tokens=2).complete("worker")
            out = subprocess.run([sys.executable, "-c", GRANDCHILD], capture_output=True, text=True)
            return os.getpid(), int(out.stdout.split()[-1])

        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(1) as pool:
                worker, grandchild = pool.apply(work, (0,))
            print("PIDS", worker, grandchild, flush=True)
    """, launcher=True)
    worker, grandchild = map(int, value_of(proc.stdout, "PIDS").split())
    roles = {r.params["aim_llama"]["pid"]: (r.params["aim_llama"]["role"], prompts(r))
             for r in read_all(repo)}
    assert roles[worker] == ("spawn-child", ["worker"])
    assert roles[grandchild] == ("main", ["grandchild"])


def test_a_child_forked_during_a_request_never_writes_that_request(workdir, repo):
    """The parent's open request (question, spans, LLM call) belongs to the parent alone: a
    child forked inside it that records nothing leaves no run; one that records has only its
    own calls."""
    proc = run_app(workdir, repo, """
        import os, sys
        import aim_llama.auto
        from llama_index.core import Document, Settings, VectorStoreIndex
        from llama_index.core.embeddings import MockEmbedding
        from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata, MockLLM
        from llama_index.core.llms.callbacks import llm_completion_callback

        class ForkingLLM(CustomLLM):
            @property
            def metadata(self):
                return LLMMetadata(model_name="forking")

            @llm_completion_callback()
            def complete(self, prompt, formatted=False, **kw):
                quiet = os.fork()
                if quiet == 0:
                    sys.exit(0)  # records nothing
                busy = os.fork()
                if busy == 0:
                    MockLLM(max_tokens=2).complete("the child's own call")
                    sys.exit(0)
                assert os.waitpid(quiet, 0)[1] == 0 and os.waitpid(busy, 0)[1] == 0
                print("BUSY", busy, flush=True)
                return CompletionResponse(text="parent answer")

            @llm_completion_callback()
            def stream_complete(self, prompt, formatted=False, **kw):
                raise NotImplementedError

        Settings.embed_model = MockEmbedding(embed_dim=8)
        index = VectorStoreIndex.from_documents([Document(text="a doc")])
        index.as_query_engine(llm=ForkingLLM()).query("the parent's own question")
        print("PARENT", os.getpid(), flush=True)
    """, launcher=False)
    runs = {r.params["aim_llama"]["pid"]: r for r in read_all(repo)}
    parent_pid, busy_pid = int(value_of(proc.stdout, "PARENT")), int(value_of(proc.stdout, "BUSY"))
    assert set(runs) == {parent_pid, busy_pid}  # the quiet child left no run
    parent, busy = runs[parent_pid], runs[busy_pid]
    assert [t for _, t in parent.text("question", kind="query")] == ["the parent's own question"]
    assert prompts(busy) == ["the child's own call"]
    assert not busy.text("question", kind="query") and not busy.text("trace", kind="query")
    assert not busy.metric("latency_ms", kind="query")
    assert_finalized([parent, busy])


def test_a_relative_repo_stays_where_the_app_started_when_it_changes_directory(workdir, repo):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            import aim_llama.auto
            from llama_index.core.llms import MockLLM
            os.makedirs("elsewhere")
            os.chdir("elsewhere")  # after activation, before the first record
            MockLLM(max_tokens=2).complete("parent")
            child = os.fork()
            if child == 0:
                os.setsid()
                os.chdir("/")  # a daemonizing child
                MockLLM(max_tokens=2).complete("daemon")
                sys.exit(0)
            assert os.waitpid(child, 0)[1] == 0
        """)],
        cwd=workdir, env=clean_env(AIM_REPO="runs"), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert not (workdir / "elsewhere" / "runs").exists() and not Path("/runs").exists()
    runs = read_all(workdir / "runs")
    assert sorted(p for r in runs for p in prompts(r)) == ["daemon", "parent"]


def test_fork_workers_that_import_llamaindex_themselves_keep_every_record(workdir, repo):
    """The parent never used LlamaIndex, so each worker activates aim-llama itself; its
    multiprocessing exit (os._exit) must still flush and finalize its run."""
    proc = run_app(workdir, repo, """
        import multiprocessing as mp
        import os
        import aim_llama.auto

        def work(x):
            from llama_index.core.embeddings import MockEmbedding
            embed = MockEmbedding(embed_dim=8)
            for i in range(5):
                embed.get_text_embedding(f"text {x} {i}")
            return os.getpid()

        if __name__ == "__main__":
            with mp.get_context("fork").Pool(2) as pool:
                pids = set(pool.map(work, range(4)))
                pool.close()
                pool.join()
            print("WORKERS", len(pids), flush=True)
    """, launcher=False)
    assert value_of(proc.stdout, "WORKERS") in ("1", "2")
    runs = read_all(repo)
    embedded = [v for r in runs for _, v in r.metric("embedded_texts", kind="embedding")]
    assert len(embedded) == 20
    assert {r.params["aim_llama"]["role"] for r in runs} == {"fork-child"}
    assert_finalized(runs)


def test_a_fork_right_after_the_first_record_does_not_stall_the_writer(workdir, repo):
    """The first record starts the writer process on aim-llama's thread; a pool forked in that
    moment used to inherit `Popen`'s error pipe, and Popen then waited for the pool's workers
    to exit: nothing of the parent was stored while the pool lived (5 of 12 runs). Forks now
    wait for the start (milliseconds). Four writers, each raced by a pool."""
    proc = run_app(workdir, repo, """
        import multiprocessing as mp
        import aim_llama
        from llama_index.core.llms import MockLLM

        def square(i):
            return i * i

        if __name__ == "__main__":
            llm = MockLLM(max_tokens=3)
            for round_ in range(4):
                aim_llama.instrument()
                llm.complete(f"first of round {round_}")
                pool = mp.get_context("fork").Pool(2)
                pool.map(square, range(4))
                for i in range(20):
                    llm.complete(f"round {round_} call {i}")
                print("FLUSHED", aim_llama.flush(timeout=6), flush=True)
                pool.close()
                pool.join()
                aim_llama.uninstrument()
        """, launcher=False)
    assert proc.stdout.count("FLUSHED True") == 4, proc.stdout + proc.stderr
    runs = read_all(repo)
    assert len(runs) == 4 and all(r.end_time is not None for r in runs)
    rounds = sorted(sorted(text for _, text in r.text("prompt", kind="llm")) for r in runs)
    assert rounds == sorted(sorted([f"first of round {n}"] + [f"round {n} call {i}" for i in range(20)])
                            for n in range(4))  # every record of the parent, in its round's run


def test_a_fork_child_keeps_the_apps_sigterm_until_it_records(workdir, repo):
    """A Python-level SIGTERM handler in a pool worker blocked on a lock can miss
    `Pool.terminate()`'s SIGTERM (CPython's race) and hang the pool: a fork child that has
    recorded nothing has nothing to flush, so it keeps the application's own disposition."""
    proc = run_app(workdir, repo, """
        import os, signal
        import aim_llama.auto
        from llama_index.core.llms import MockLLM

        def caught():  # the kernel's view: SIGTERM has a handler (`signal.getsignal` says
            # what the application set, SIG_DFL here, whoever is in front of it)
            with open("/proc/self/status") as status:
                mask = next(int(l.split()[1], 16) for l in status if l.startswith("SigCgt:"))
            return bool(mask & (1 << (signal.SIGTERM - 1)))

        MockLLM(max_tokens=3).complete("parent")
        assert caught() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the parent flushes
        pid = os.fork()
        if pid == 0:
            before = not caught()
            MockLLM(max_tokens=3).complete("child")
            after = caught()
            print("CHILD", before, after, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """, launcher=False)
    assert "CHILD True True" in proc.stdout, proc.stdout + proc.stderr


def test_a_worker_whose_first_record_comes_from_a_thread_gets_its_flush_on_sigterm(workdir, repo):
    """Only the main thread may install a signal handler: a fork child or a spawn-pool worker
    whose first record comes from another thread (LLM calls in a thread pool) is armed when its
    main thread next runs, and a SIGTERM then stores what it recorded."""
    proc = run_app(workdir, repo, """
        import os, signal, threading, time
        import multiprocessing as mp
        from concurrent.futures import ThreadPoolExecutor
        import aim_llama.auto
        from llama_index.core.llms import MockLLM

        def caught():
            with open("/proc/self/status") as status:
                mask = next(int(l.split()[1], 16) for l in status if l.startswith("SigCgt:"))
            return bool(mask & (1 << (signal.SIGTERM - 1)))

        def in_threads(tag):
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(MockLLM(max_tokens=3).complete, [f"{tag} {i}" for i in range(20)]))
            return caught()

        if __name__ == "__main__":
            MockLLM(max_tokens=3).complete("parent")
            pid = os.fork()
            if pid == 0:
                before = caught()
                print("FORK", before, in_threads("fork child"), flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
                os._exit(3)
            print("FORK STATUS", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
            pool = mp.get_context("spawn").Pool(1)
            print("SPAWN", pool.apply(in_threads, ("spawn worker",)), flush=True)
            pool.terminate()  # SIGTERM to the worker
            pool.join()
        """, launcher=False)
    assert "FORK False True" in proc.stdout and "SPAWN True" in proc.stdout, proc.stdout + proc.stderr
    assert "FORK STATUS -15" in proc.stdout, proc.stdout
    runs = read_all(repo)
    assert_finalized(runs)
    prompts = sorted(sorted(t for _, t in r.text("prompt", kind="llm")) for r in runs)
    assert prompts == sorted([["parent"], sorted(f"fork child {i}" for i in range(20)),
                              sorted(f"spawn worker {i}" for i in range(20))]), prompts


def test_a_fork_never_waits_for_a_slow_writer_start_and_the_child_records(workdir, repo,
                                                                           tmp_path):
    """The fork lock covers only `Popen` (milliseconds), not the writer process's start-up nor
    the config it is sent (here ~150 kB of run parameters, more than a pipe holds, to a writer
    that takes 4 s to start); a child forked meanwhile records into its own run."""
    slow = tmp_path / "slowwriter"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('AIM_LLAMA_ROLE') == 'writer':\n    time.sleep(4)\n")
    params = "".join(f'p{i:04d} = "{"x" * 40}"\n' for i in range(3000))
    (workdir / "aim_llama.toml").write_text(f"[run_params]\n{params}")
    script = workdir / "app.py"
    script.write_text(textwrap.dedent("""
        import os, time
        import aim_llama, aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=3).complete("parent")
        time.sleep(0.2)  # the writer process is being started now
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            MockLLM(max_tokens=3).complete("child")
            print("CHILD FLUSHED", aim_llama.flush(timeout=20), flush=True)
            os._exit(0)
        print("FORK TOOK", round(time.monotonic() - started, 3), flush=True)
        os.waitpid(pid, 0)
        """))
    proc = subprocess.run([sys.executable, str(script)], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo), PYTHONPATH=str(slow)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("FORK TOOK ")[1].split()[0]) < 1.0, proc.stdout
    assert "CHILD FLUSHED True" in proc.stdout, proc.stdout + proc.stderr
    prompts_by_role = {r.params["aim_llama"]["role"]: prompts(r) for r in read_all(repo)}
    assert prompts_by_role == {"main": ["parent"], "fork-child": ["child"]}
