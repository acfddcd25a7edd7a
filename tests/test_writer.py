"""The writer: never blocks the app, never loses data silently, flushes at exit and on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aim_llama.writer_process import COALESCE
from aimread import read_run, terminal_lines
from conftest import APPS, clean_env, only_run

WRITER_APP = APPS / "writer_app.py"


def start(repo: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER_APP), *args],
        cwd=workdir,
        env=clean_env(AIM_REPO=str(repo), **(env or {})),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen[str], word: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(word):
            return line
    raise AssertionError(f"{word} not seen; stderr: {proc.stderr.read() if proc.stderr else ''}")


def values(run, name: str = "value", **ctx) -> list[float]:
    return [v for _, v in run.metric(name, **ctx)]


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_normal_exit_with_full_queue_flushes_everything(repo, workdir, backend):
    proc = start(repo, workdir, "20000", "exit", "--backend", backend, "--flush-timeout", "100")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = only_run(repo)
    assert values(run, kind="t0") == [float(i) for i in range(20000)]
    assert run.end_time is not None and not run.active
    assert run.params["aim_llama"]["writer"] == backend


def test_flush_makes_records_readable_while_the_app_runs(repo, workdir):
    proc = start(repo, workdir, "3000", "flush-wait")
    try:
        line = wait_for(proc, "FLUSHED")
        _, ok, run_hash = line.split()
        assert ok == "True"
        run = read_run(repo, run_hash)  # the app is still alive and holds the run open
        assert len(values(run, kind="t0")) == 3000
        assert run.end_time is None  # not finalized yet: the app has not exited
    finally:
        proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    assert read_run(repo, run_hash).end_time is not None
    # the run's databases were opened with aim-llama's memtable sizes, not Aim's 1 MB (as
    # the options file RocksDB writes when it opens a database for writing says; options set
    # after Aim opened it are never read)
    for db in ("seqs", "meta"):
        options = list((repo / ".aim" / db / "chunks" / run_hash).glob("OPTIONS-*"))
        assert options and all("  write_buffer_size=8388608\n" in f.read_text()
                               for f in options), (db, options)


def test_the_thread_writer_leaves_the_applications_own_aim_runs_at_aims_memtable_sizes(
        run_py, repo):
    """The larger memtables are the writer's: with the thread writer, an Aim run the
    application opens itself (beside aim-llama's) keeps Aim's own 1 MB ones."""
    out = run_py("""
        import os
        from aim import Run
        from aim_llama.aimrun import RunConfig
        from aim_llama.records import Track
        from aim_llama.writer import Writer

        writer = Writer(RunConfig(repo=os.environ["AIM_REPO"], app_pid=os.getpid(),
                                  system_tracking_interval=None, log_system_params=False,
                                  version="test", writer="thread"),
                        queue_size=1000, flush_timeout=30, backend="thread")
        writer.submit(Track("value", 1.0, "metric", {"kind": "t0"}))
        assert writer.flush(30)
        own = Run(repo=os.environ["AIM_REPO"], system_tracking_interval=None,
                  log_system_params=False)
        own.track(2.0, name="mine")
        print("OWN", own.hash, flush=True)
        own.close()
        writer.submit(Track("value", 3.0, "metric", {"kind": "t0"}))
        writer.close()
    """).stdout
    own_hash = out.split("OWN ")[1].split()[0]
    sizes = {}
    for db in ("seqs", "meta"):
        for run_dir in (repo / ".aim" / db / "chunks").iterdir():
            for f in run_dir.glob("OPTIONS-*"):
                size = f.read_text().split("  write_buffer_size=")[1].split()[0]
                sizes.setdefault(run_dir.name == own_hash, set()).add(int(size))
    assert sizes == {True: {1024 * 1024}, False: {8 * 1024 * 1024}}, sizes


def test_the_writer_process_pins_mallocs_mmap_threshold_unless_the_user_did(monkeypatch):
    """glibc raises its mmap threshold as large blocks are freed, and RocksDB's freed blocks
    then stay in the heaps (the writer's RSS grew ~90 MB over 200 000 queries)."""
    from aim_llama.writer_process import pin_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert pin_mmap_threshold() is (sys.platform == "linux")  # (glibc on these machines)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False


def test_queue_overflow_drops_are_counted_and_reported(repo, workdir):
    proc = start(repo, workdir, "100000", "exit", "--queue-size", "500")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    dropped = int(out.split("dropped=")[1].split()[0])
    assert dropped > 0
    run = only_run(repo)
    stored = len(values(run, kind="t0"))
    drops = run.metric("dropped_records", kind="queue")
    assert drops and drops[-1][1] == dropped  # the final count is on the run
    assert stored + dropped == 100000  # nothing vanished without being counted
    warnings = [line for line in err.splitlines() if "queue is full" in line]
    assert len(warnings) == 1  # reported once, not per record
    # (naming the setting and its variable, with the size in force)
    assert "queue is full (500 records: setting queue_size, AIM_LLAMA_QUEUE_SIZE)" in warnings[0]
    assert f"{dropped} dropped because the queue was full" in err  # and summarized at exit


def test_threads_get_explicit_steps_and_lose_nothing(repo, workdir):
    proc = start(repo, workdir, "16000", "exit", "--threads", "8")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = only_run(repo)
    for k in range(8):
        points = run.metric("value", kind=f"t{k}")
        assert [s for s, _ in points] == list(range(2000))
        assert sorted(v for _, v in points) == [float(i) for i in range(k * 2000, (k + 1) * 2000)]


def test_sigterm_flushes_finalizes_and_keeps_sigterm_status(repo, workdir):
    proc = start(repo, workdir, "5000", "sigterm-wait", "--text")
    wait_for(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert "NOT KILLED" not in out
    run = only_run(repo)
    texts = run.text("note", kind="t")
    assert len(texts) == 5000 and texts[-1][1] == "record 4999"
    assert run.end_time is not None and not run.active


def test_a_sigterm_to_the_app_and_its_writer_together_loses_nothing(repo, workdir):
    """`systemctl stop` (KillMode=control-group), `pkill python`, a container runtime: the
    SIGTERM reaches every process, the writer process too. It must outlive the application's
    flush (it was killed with records in flight: the run stayed active, records were lost)."""
    proc = start(repo, workdir, "5000", "sigterm-wait", "--text")
    writer_pid = int(wait_for(proc, "READY").split()[1])
    assert writer_pid > 0
    os.kill(writer_pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    assert "killed by signal" not in err and "lost" not in err, err
    run = only_run(repo)
    texts = run.text("note", kind="t")
    assert len(texts) == 5000 and texts[-1][1] == "record 4999"
    assert run.end_time is not None and not run.active


def test_the_apps_interpreter_options_do_not_reach_the_writer_process(repo, workdir):
    """`PYTHONWARNINGS=error::DeprecationWarning` (a strict CI, say) made Aim's own import in
    the writer process fail: no run at all, every record lost. The application keeps it."""
    proc = start(repo, workdir, "300", "exit", env={"PYTHONWARNINGS": "error::DeprecationWarning"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "aim_llama" not in err, err
    assert values(only_run(repo), kind="t0") == [float(i) for i in range(300)]


def test_an_app_that_makes_encoding_warnings_errors_is_still_recorded(run_py, repo):
    """`-X warn_default_encoding -W error::EncodingWarning` (PEP 597's strict check) turned
    recording off: aim-llama opened `/proc/self/status` without an encoding at activation."""
    proc = run_py(
        """
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=4)
        for i in range(3):
            llm.complete(f"q{i}")
        """,
        env={"PYTHONWARNDEFAULTENCODING": "1", "PYTHONWARNINGS": "error::EncodingWarning"},
    )
    assert "aim_llama" not in proc.stderr and "EncodingWarning" not in proc.stderr, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["q0", "q1", "q2"]


def test_sigterm_chains_to_the_apps_own_handler(repo, workdir):
    proc = start(repo, workdir, "2000", "app-handler")
    wait_for(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7 and "APP HANDLER" in out
    run = only_run(repo)
    assert len(values(run, kind="t0")) == 2000 and run.end_time is not None


def test_sigterm_through_auto_on_a_real_pipeline(repo, workdir):
    code = (
        "import aim_llama.auto, time, sys\n"
        "from llama_index.core import Settings\n"
        "from llama_index.core.llms import MockLLM\n"
        "llm = MockLLM(max_tokens=3)\n"
        "for i in range(300): llm.complete(f'q{i}')\n"
        "print('READY', flush=True); time.sleep(60); print('NOT KILLED')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=workdir, env=clean_env(AIM_REPO=str(repo)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == [f"q{i}" for i in range(300)]
    assert run.end_time is not None and not run.active


def test_sigkill_keeps_what_was_handed_over_and_the_writer_finalizes(repo, workdir):
    proc = start(repo, workdir, "4000", "kill-wait")
    line = wait_for(proc, "FLUSHED")
    run_hash = line.split()[2]
    wait_for(proc, "READY")
    proc.kill()
    proc.communicate(timeout=60)
    # The writer process sees the pipe close, stores what it received and finalizes the run.
    deadline = time.monotonic() + 30
    run = read_run(repo, run_hash)
    while run.end_time is None and time.monotonic() < deadline:
        time.sleep(0.5)
        run = read_run(repo, run_hash)
    got = values(run, kind="t0")
    assert got[:2000] == [float(i) for i in range(2000)]  # everything flushed before the kill
    assert got == [float(i) for i in range(len(got))]  # in order, no holes
    assert run.end_time is not None


def test_unusable_repo_leaves_app_unaffected_with_one_error(run_py, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".aim").write_text("a file where Aim's directory should be")
    proc = run_py(
        script=APPS / "rag.py", args=["3", "--exit-code", "0"],
        env={"AIM_REPO": str(repo)},
    )
    assert "DONE" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "cannot create the Aim run" in line]
    assert len(errors) == 1, proc.stderr
    assert str(repo) in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["the repo", "on its way"])
def test_a_repo_path_a_file_is_in_the_way_of_is_a_configuration_error(run_py, tmp_path,
                                                                        where):
    """A file where the repo (or a directory holding it) should be can never work: a
    one-line configuration error naming the setting and its source, as for any bad value
    (it was a writer error naming neither, after the app had started recording)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    repo = blocker if where == "the repo" else blocker / "sub" / "repo"
    proc = run_py(script=APPS / "rag.py", args=["3", "--exit-code", "0"],
                  env={"AIM_REPO": str(repo)})
    assert "DONE" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "invalid setting repo (env AIM_REPO=" in lines[0]
    assert f"{str(blocker)!r}" in lines[0] and "is a file" in lines[0]
    assert "allowed: a directory path or aim://host:port" in lines[0]
    assert not (tmp_path / ".aim").exists() and blocker.read_text() == "not a directory"


def _refuse_big_files() -> None:
    """In the child: any file beyond 300 kB fails to grow (EFBIG), like a full disk."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_repo_that_stops_taking_writes_is_one_error_and_counted_loss(tmp_path, workdir,
                                                                        backend):
    """RocksDB failing mid-run (here: the file-size limit, as a full disk does) must not kill
    the writer, hang the exit, or lose records without counting them."""
    repo = tmp_path / "repo"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(APPS / "rag.py"), "300"], cwd=workdir, capture_output=True,
        text=True, timeout=120, preexec_fn=_refuse_big_files,
        env=clean_env(AIM_REPO=str(repo), AIM_LLAMA_WRITER=backend, AIM_LLAMA_FLUSH_TIMEOUT="5"),
    )
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    assert time.monotonic() - started < 60
    errors = [line for line in proc.stderr.splitlines() if "cannot write to the Aim repo" in line]
    assert len(errors) == 1, proc.stderr
    assert str(repo) in errors[0] and "File too large" in errors[0]
    lost = re.search(r"Aim writer closed: (\d+) records could not be stored", proc.stderr)
    assert lost is not None and int(lost.group(1)) > 1000, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_repo_deleted_while_the_app_runs_is_one_error_and_counted_loss(run_py, repo, backend):
    """... and no traceback from Aim's own threads, a flush that says records were lost, and an
    exit that Aim's clean-up (whose finalizers fail on the deleted files) does not hold."""
    proc = run_py(
        """
        import shutil, sys, aim_llama, aim_llama.auto
        from llama_index.core import Document, Settings, VectorStoreIndex
        from llama_index.core.embeddings import MockEmbedding
        from llama_index.core.llms import MockLLM
        Settings.llm, Settings.embed_model = MockLLM(max_tokens=8), MockEmbedding(embed_dim=8)
        engine = VectorStoreIndex.from_documents([Document(text="a doc")]).as_query_engine()
        engine.query("before")
        print("FLUSHED", aim_llama.flush(60), flush=True)
        shutil.rmtree(sys.argv[1])
        for i in range(3):
            engine.query(f"after {i}")
        print("AFTER", aim_llama.flush(60), flush=True)
        """,
        args=[str(repo)], timeout=60,
        env={"AIM_LLAMA_WRITER": backend, "AIM_LLAMA_FLUSH_TIMEOUT": "3"},
    )
    assert "FLUSHED True" in proc.stdout and "AFTER False" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "cannot write to the Aim repo" in line]
    assert len(errors) == 1 and "its directory was removed" in errors[0], proc.stderr
    lost = re.search(r"(\d+) records could not be stored", proc.stderr)
    assert lost is not None and int(lost.group(1)) >= 3 * 10, proc.stderr


def test_exit_never_exceeds_the_flush_timeout(repo, workdir):
    """50k texts take the writer several seconds; with a 1 s timeout the app must not wait for them."""
    proc = start(repo, workdir, "50000", "exit", "--text", "--flush-timeout", "1", "--backend", "thread")
    out, err = proc.communicate(timeout=120)
    exiting = float(out.split("EXITING ")[1].split()[0])
    ended = time.time()
    assert proc.returncode == 0
    # aim-llama's own exit wait is bounded by the timeout (plus scheduling slack on a busy
    # machine: the regression this guards against is a wait for all 50k texts, ~10 s) ...
    assert float(out.split("CLOSE_TOOK ")[1].split()[0]) < 1.0 + 1.5
    # ... and the whole exit, Aim's and Python's teardown included, never hangs
    assert ended - exiting < 1.0 + 4.0
    assert "did not finish within the flush timeout (1s, AIM_LLAMA_FLUSH_TIMEOUT)" in err
    assert "records not handed to it" in err


def test_writer_needs_no_llamaindex(repo, workdir):
    code = (
        "import sys, os\n"
        "from aim_llama.aimrun import RunConfig\nfrom aim_llama.writer import Writer\n"
        "from aim_llama.records import Track\n"
        "cfg = RunConfig(repo=os.environ['AIM_REPO'], system_tracking_interval=None)\n"
        "w = Writer(cfg, backend='thread')\n"
        "w.submit(Track('x', 1.0))\nw.close()\n"
        "print('LLAMA', any(m.startswith('llama_index') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=clean_env(AIM_REPO=str(repo)),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "LLAMA False" in out
    assert [v for _, v in only_run(repo).metric("x")] == [1.0]


def test_app_thread_never_imports_aim(run_py):
    """With the process writer, Aim is imported by the writer process, not by the application."""
    check = run_py(
        "import aim_llama.auto, sys\n"
        "from llama_index.core.llms import MockLLM\n"
        "MockLLM().complete('x')\n"
        "import aim_llama; aim_llama.flush()\n"
        "print('AIM', 'aim' in sys.modules, 'aim.sdk' in sys.modules)\n"
    )
    assert "AIM False False" in check.stdout


SIGNAL_MASKS_APP = """
import os, signal, sys, threading
from aim_llama.aimrun import RunConfig
from aim_llama.records import Track
from aim_llama.writer import Writer

def term_blocked(status_path):
    with open(status_path) as fh:
        line = next(line for line in fh if line.startswith("SigBlk:"))
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

writer = Writer(RunConfig(repo=os.environ["AIM_REPO"], system_tracking_interval=None,
                          log_system_params=False), backend=sys.argv[1])
writer.submit(Track("value", 1.0, "metric", {"kind": "t"}))
assert writer.flush(60)
names = {t.native_id: t.name for t in threading.enumerate()}
# the main thread first (its task id is the pid; others' may be lower once pids wrapped round)
for tid in sorted(os.listdir("/proc/self/task"), key=lambda t: (int(t) != os.getpid(), int(t))):
    name = names.get(int(tid), "(not a Python thread)")
    print("THREAD", name, term_blocked(f"/proc/self/task/{tid}/status"))
proc = getattr(writer._backend, "proc", None)
if proc is not None:
    print("WRITER_PROCESS", term_blocked(f"/proc/{proc.pid}/status"))
writer.close()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
@pytest.mark.parametrize("backend", ["process", "thread"])
def test_only_the_main_thread_can_receive_the_applications_signals(run_py, backend):
    """The kernel gives a process-wide SIGTERM to any thread that does not block it, and Python
    runs the handler on the main thread only when that wakes up: aim-llama's threads (and
    Aim's and RocksDB's, started from them) block such signals; the writer process does not."""
    proc = run_py(SIGNAL_MASKS_APP, args=[backend])
    threads = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("THREAD")]
    assert threads[0] == ["MainThread", "False"]  # the first task is the main thread
    ours = [t for t in threads if t[0].startswith("aim-llama-")]
    assert ours and all(t[-1] == "True" for t in ours), threads
    assert all(t[-1] == "True" for t in threads[1:]), threads  # every other thread too
    if backend == "thread":
        assert any(t[0] == "(not" for t in threads), threads  # Aim's / RocksDB's native threads
    else:
        assert "WRITER_PROCESS False" in proc.stdout


def test_a_writer_process_that_dies_is_replaced_and_the_run_goes_on(repo, workdir):
    """Its death costs the application nothing (not even with SIGPIPE's default action, which
    a write to its pipe would raise); what it never stored is counted, not hidden; a new writer
    process continues the same run, its sequences after their last stored step, and
    finalizes it."""
    # 600 records a side: those sent to the stopped writer must fit in its pipe (~70 bytes
    # each; a pipe holds 64 KiB here), or they stay in the application and the next one
    # stores them (nothing is lost then)
    proc = start(repo, workdir, "1200", "writer-dies", "--sigpipe-default")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "ALIVE" in out and "EXITING" in out
    assert "FLUSH_AFTER_DEATH False True" in out  # the loss is said; what came after is stored
    assert "RESTARTS 1" in out
    assert re.search(r"the Aim writer process \(pid \d+\) ended unexpectedly \(killed by signal 9\)"
                     r": 600 records it had received were not stored; a new writer process "
                     r"\(pid \d+\) continues run [0-9a-f]+ \(restart 1 of at most 3\)", err), err
    # 600 stored before it was stopped; 600 sent to it and never stored
    summary = re.search(r"Aim writer closed: (\d+) records could not be stored", err)
    assert summary is not None and int(summary.group(1)) == 600, err
    assert "flush timeout" not in err  # a dead writer is not a slow one
    run = only_run(repo)  # one run: the new writer continued it
    assert run.metric("value", kind="t0") == (
        [(i, float(i)) for i in range(600)] + [(600 + i, 5000.0 + i) for i in range(100)])
    assert values(run, kind="late") == [-1.0]
    assert run.end_time is not None and not run.active  # finalized


def test_a_writer_process_that_keeps_dying_is_restarted_three_times_then_given_up(repo,
                                                                                  workdir):
    proc = start(repo, workdir, "50", "writer-dies-often")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [line for line in out.splitlines() if line.startswith("FLUSH ")] == [
        f"FLUSH {i} True" for i in range(4)]
    assert "RESTARTS 3" in out and "FLUSH_AFTER_LAST_DEATH False" in out
    assert len(re.findall(r"a new writer process \(pid \d+\) continues run", err)) == 3, err
    assert re.search(r"ended unexpectedly \(killed by signal 9\): 0 records it had received were "
                     r"not stored, and later records are lost \(it was restarted 3 times "
                     r"already\)", err), err
    run = only_run(repo)
    assert values(run, kind="t0") == [float(i) for i in range(200)]
    assert not values(run, kind="late")


def test_records_lost_with_a_dead_writer_are_counted_exactly_after_queue_drops(repo, workdir):
    """The writer's own drop-count records travel with the application's: they must not make
    the records a dead writer process never stored look fewer than they were."""
    proc = start(repo, workdir, "200", "drops-then-dies", "--queue-size", "20")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    dropped = int(re.search(r"dropped=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert dropped > 0
    summary = re.search(r"Aim writer closed: (\d+) records could not be stored, (\d+) dropped",
                        err)
    assert summary is not None, err
    assert int(summary.group(1)) == 15 and int(summary.group(2)) == dropped, err
    run = only_run(repo)
    assert len(values(run, kind="t0")) + dropped == 1000  # every record accounted for
    assert not values(run, kind="sent-to-dead")


def test_exit_is_bounded_when_the_writer_process_is_stuck_with_a_full_pipe(repo, workdir):
    proc = start(repo, workdir, "10", "writer-stalls", "--flush-timeout", "2")
    writer_pid = int(wait_for(proc, "STOPPED").split()[1])
    try:
        proc.wait(timeout=30)  # (its output pipes stay open as long as the writer process lives)
    finally:
        os.kill(writer_pid, signal.SIGKILL)  # stopped: it would never leave by itself
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    took = float(re.search(r"CLOSE_TOOK (\S+)", out).group(1))  # type: ignore[union-attr]
    assert took < 2.0 + 1.5, out  # (slack for a busy machine; unbounded was the bug)
    assert "did not finish within the flush timeout (2s" in err, err


GRACEFUL_APP = """
import os, signal, sys, threading
stop = threading.Event()
def on_term(signum, frame):  # the application's own handler, installed before aim-llama's
    print("APP HANDLER", flush=True)
    if sys.argv[1] == "exit-now":
        os._exit(7)
    stop.set()  # a graceful shutdown: finish the work in hand, then leave
signal.signal(signal.SIGTERM, on_term)
import aim_llama.auto
from llama_index.core.llms import MockLLM
llm = MockLLM(max_tokens=3)
for i in range(100):
    llm.complete(f"before {i}")
print("READY", flush=True)
while not stop.wait(0.05):
    pass
for i in range(50):
    llm.complete(f"after {i}")
print("DRAINED", flush=True)
"""


def _sigterm_when_ready(code: str, arg: str, repo, workdir):
    """Run `code` with `arg`, SIGTERM it once it prints READY; (process, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, arg], cwd=workdir,
        env=clean_env(AIM_REPO=str(repo)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc, out, err


@pytest.mark.parametrize("handler", ["graceful", "exit-now"])
def test_sigterm_with_the_apps_own_handler_stores_everything_before_and_after(repo, workdir,
                                                                               handler):
    """SIGTERM goes on to the application's handler after everything so far is stored; if the
    process lives on (a graceful shutdown), what it records next is stored too, and the run is
    finalized at its exit — or, if the handler leaves through `os._exit`, by the writer."""
    proc, out, err = _sigterm_when_ready(GRACEFUL_APP, handler, repo, workdir)
    assert "APP HANDLER" in out, err
    expected = [f"before {i}" for i in range(100)]
    if handler == "graceful":
        assert proc.returncode == 0 and "DRAINED" in out, err
        expected += [f"after {i}" for i in range(50)]
    else:
        assert proc.returncode == 7, err
    assert "not stored" not in err and "not written" not in err, err
    deadline = time.monotonic() + 30
    run = only_run(repo)
    while run.end_time is None and time.monotonic() < deadline:  # os._exit: the writer finalizes
        time.sleep(0.5)
        run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == expected
    assert run.end_time is not None and not run.active


SERVER_LIKE_APP = """
import signal, sys, threading
import aim_llama.auto
stop = threading.Event()
captured = []
def handle_exit(signum, frame):
    captured.append(signum)
    stop.set()
if sys.argv[1] == "activated first":  # (uvicorn, one process: the app is loaded before serving)
    from llama_index.core.llms import MockLLM
# What uvicorn's `capture_signals` does around serving; in a `--workers` worker (and a gunicorn
# --preload fork child) the app, and so LlamaIndex, is loaded inside it.
original = {sig: signal.signal(sig, handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
from llama_index.core.llms import MockLLM
assert signal.getsignal(signal.SIGTERM) is handle_exit, signal.getsignal(signal.SIGTERM)
assert original[signal.SIGTERM] is signal.SIG_DFL, original
llm = MockLLM(max_tokens=3)
for i in range(100):
    llm.complete(f"before {i}")
print("READY", flush=True)
while not stop.wait(0.05):
    pass
for i in range(20):
    llm.complete(f"in flight {i}")  # the requests in hand finish
for sig, handler in original.items():  # then: the handlers it found, and the signal again
    signal.signal(sig, handler)
for signum in reversed(captured):
    signal.raise_signal(signum)
print("SURVIVED", flush=True)
"""


@pytest.mark.parametrize("order", ["activated first", "activated inside"])
def test_a_server_that_puts_back_the_default_and_raises_sigterm_again_loses_nothing(
        repo, workdir, order):
    """uvicorn's shutdown: put back the handlers found before serving, then raise the signal
    again. When aim-llama was activated while serving (a worker process), what it found was
    SIG_DFL, and the process died of it without a flush: the requests finished after the
    SIGTERM were lost without a word. The handler the application installs is what
    `signal.getsignal` says, and the process still dies of SIGTERM."""
    proc, out, err = _sigterm_when_ready(SERVER_LIKE_APP, order, repo, workdir)
    assert proc.returncode == -signal.SIGTERM and "SURVIVED" not in out, err
    assert "Traceback" not in err, err
    run = only_run(repo)
    expected = [f"before {i}" for i in range(100)] + [f"in flight {i}" for i in range(20)]
    assert [t for _, t in run.text("prompt", kind="llm")] == expected
    assert run.end_time is not None and not run.active


def test_handlers_set_after_activation_are_chained_to_and_reported_as_set(run_py):
    """`signal.signal` / `signal.getsignal` after activation behave as Python's for the
    application (what it set is what it reads; its errors are Python's), while the flush stays
    in front of SIGTERM; an ignored SIGTERM, and an app's own Ctrl-C handler, get no flush in
    front; `uninstrument()` gives the application its handler and Python's functions back."""
    proc = run_py(
        """
        import os, signal, threading
        real = signal.signal
        import aim_llama, aim_llama.auto
        from llama_index.core.llms import MockLLM

        def kernel(signum):  # "caught", "ignored" or "default", as the kernel sees it
            with open("/proc/self/status") as status:
                masks = {l.split(":")[0]: int(l.split()[1], 16) for l in status
                         if l[:6] in ("SigCgt", "SigIgn")}
            bit = 1 << (signum - 1)
            return ("caught" if masks["SigCgt"] & bit else
                    "ignored" if masks["SigIgn"] & bit else "default")

        MockLLM(max_tokens=3).complete("one")
        assert signal.signal is not real
        got = []
        def on_term(signum, frame):
            got.append(aim_llama.autoinstrument._active.writer.queued)
        assert signal.signal(signal.SIGTERM, on_term) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is on_term and kernel(signal.SIGTERM) == "caught"
        for i in range(500):
            MockLLM(max_tokens=3).complete(f"call {i}")
        signal.raise_signal(signal.SIGTERM)
        assert got == [0], got  # flushed in front of the app's handler, which ran
        assert signal.signal(signal.SIGTERM, signal.SIG_IGN) is on_term
        assert kernel(signal.SIGTERM) == "ignored"
        signal.raise_signal(signal.SIGTERM)  # ignored: nothing happens
        assert signal.signal(signal.SIGTERM, on_term) is signal.SIG_IGN
        assert kernel(signal.SIGTERM) == "caught" and signal.getsignal(signal.SIGTERM) is on_term
        on_int = lambda signum, frame: None
        assert signal.signal(signal.SIGINT, on_int) is signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is on_int
        errors = []
        try:
            signal.signal(signal.SIGTERM, "not a handler")
        except TypeError as exc:
            errors.append("TypeError")
        def off_main():
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except ValueError:
                errors.append("ValueError")
        t = threading.Thread(target=off_main)
        t.start()
        t.join()
        assert errors == ["TypeError", "ValueError"], errors
        assert signal.getsignal(signal.SIGTERM) is on_term
        aim_llama.uninstrument()
        assert signal.signal is real and signal.getsignal(signal.SIGTERM) is on_term
        print("CHECKED", flush=True)
        """,
        check=False,
    )
    assert proc.returncode == 0 and "CHECKED" in proc.stdout, proc.stdout + proc.stderr


def test_signal_numbers_of_any_int_type_and_uninstrument_off_the_main_thread(run_py):
    """A signal number given as another `int` subclass is still SIGTERM to the wrapper; an
    `uninstrument()` from another thread gives the application its handler back (when the main
    thread next runs), and a new activation then is one handler in front, not two."""
    proc = run_py(
        """
        import signal, threading, time
        import aim_llama, aim_llama.auto
        from llama_index.core.llms import MockLLM

        class Num(int):
            pass

        def on_term(signum, frame):
            calls.append(signum)
        calls = []
        MockLLM(max_tokens=3).complete("one")
        assert signal.signal(Num(signal.SIGTERM), on_term) is signal.SIG_DFL
        assert signal.getsignal(Num(signal.SIGTERM)) is on_term
        t = threading.Thread(target=aim_llama.uninstrument)
        t.start()
        t.join()
        time.sleep(0)  # the main thread runs Python code: the handler is put back
        assert signal.getsignal(signal.SIGTERM) is on_term, signal.getsignal(signal.SIGTERM)
        assert aim_llama.instrument()
        MockLLM(max_tokens=3).complete("two")
        assert signal.getsignal(signal.SIGTERM) is on_term
        chain = aim_llama.autoinstrument._active.signals
        from aim_llama.lifecycle import _real_getsignal
        assert _real_getsignal(signal.SIGTERM) == chain._handle
        assert chain._previous[signal.SIGTERM] is on_term  # chained straight to the app's
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM], calls
        print("CHECKED", flush=True)
        """,
        check=False,
    )
    assert proc.returncode == 0 and "CHECKED" in proc.stdout, proc.stdout + proc.stderr


def test_a_sigterm_handler_python_does_not_know_of_is_left_alone(run_py):
    """`faulthandler.register(SIGTERM)` (or a C extension's handler) before activation: Python
    reports SIG_DFL, but replacing it would stop its owner; aim-llama leaves it and says so."""
    proc = run_py(
        """
        import faulthandler, os, signal, sys, time
        faulthandler.register(signal.SIGTERM, file=sys.stdout, chain=False)
        import aim_llama, aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=3).complete("one")
        os.kill(os.getpid(), signal.SIGTERM)  # faulthandler dumps the stack; the app goes on
        time.sleep(0.5)
        print("SURVIVED", aim_llama.flush(20), flush=True)
        """,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SURVIVED True" in proc.stdout and "Current thread" in proc.stdout, proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "handler outside Python" in line]
    assert len(warnings) == 1 and "SIGTERM" in warnings[0], proc.stderr


UNINSTRUMENT_APP = """
import os, signal, sys, threading
if "app handler" in sys.argv[2]:
    signal.signal(signal.SIGTERM, lambda signum, frame: print("APP HANDLER", flush=True))
import aim_llama
from aim_llama import autoinstrument
from aim_llama.records import Track
from llama_index.core.llms import MockLLM
aim_llama.instrument(writer=sys.argv[1])
MockLLM(max_tokens=3).complete("hello")
writer = autoinstrument._active.writer
for i in range(3000):
    writer.submit(Track("note", f"record {i}", "text", {"kind": "t"}))
original_close = writer._close
def close_under_sigterm(timeout):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives as uninstrument() starts flushing
    return original_close(timeout)
writer._close = close_under_sigterm
if sys.argv[2].startswith("main thread"):
    aim_llama.uninstrument()
else:
    worker = threading.Thread(target=aim_llama.uninstrument)
    worker.start()
    worker.join()  # the main thread takes the signal here and waits for the worker's flush
print("UNINSTRUMENTED", flush=True)
"""


@pytest.mark.parametrize(("backend", "where"), [("thread", "main thread"),
                                                ("process", "another thread"),
                                                ("process", "main thread, app handler")])
def test_sigterm_during_uninstrument_waits_for_its_flush_then_kills(repo, workdir, backend,
                                                                   where):
    proc = subprocess.Popen(
        [sys.executable, "-c", UNINSTRUMENT_APP, backend, where], cwd=workdir,
        env=clean_env(AIM_REPO=str(repo)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    if "app handler" in where:  # it decides: here the process lives on
        assert proc.returncode == 0 and "APP HANDLER" in out and "UNINSTRUMENTED" in out, err
    else:
        assert proc.returncode == -signal.SIGTERM, err  # SIGTERM's own status, after the flush
        assert "UNINSTRUMENTED" not in out
    run = only_run(repo)
    assert [t for _, t in run.text("note", kind="t")] == [f"record {i}" for i in range(3000)]
    assert run.end_time is not None and not run.active


def test_an_app_that_closes_every_descriptor_gets_its_new_ones_untouched(run_py):
    """A hand-rolled daemonization closes every fd and opens new ones, which may get the
    numbers of aim-llama's pipes: aim-llama must then neither read, write nor close them."""
    proc = run_py(
        """
        import os, socket
        import aim_llama.auto
        import aim_llama
        from aim_llama import autoinstrument
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=4)
        llm.complete("before")
        assert aim_llama.flush(60)
        backend = autoinstrument._active.writer._backend
        fds = (backend._fd, backend._ack_fd)
        os.closerange(3, 4096)
        pairs = [socket.socketpair() for _ in range(4)]  # the lowest numbers again
        mine = {s.fileno(): s for pair in pairs for s in pair}
        peer = {a.fileno(): b for a, b in pairs} | {b.fileno(): a for a, b in pairs}
        assert set(fds) <= set(mine)
        for fd in fds:
            peer[fd].sendall(b"app data %d;" % fd)
        for i in range(3):
            llm.complete(f"after {i}")
        aim_llama.flush(5)
        for fd in fds:
            mine[fd].setblocking(False)
            peer[fd].setblocking(False)
            got = mine[fd].recv(65536)
            try:
                foreign = peer[fd].recv(65536)
            except BlockingIOError:
                foreign = b""
            print("FD", fd, got == b"app data %d;" % fd, len(foreign), flush=True)
        """,
    )
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("FD ")]
    assert len(lines) == 2 and all(ok == "True" and foreign == "0" for _, _, ok, foreign in lines)
    assert proc.stderr.count("the application closed aim-llama's pipes") == 1, proc.stderr
    assert "records could not be stored" in proc.stderr


def test_an_app_started_without_stdin_and_stdout_keeps_them_closed(run_py, repo):
    """Started with descriptors 0 and 1 closed (`<&- >&-`, some daemons), aim-llama's pipes
    took those numbers: the app's own writes to "stdout" (a C library's log line) went into
    the writer's protocol, which stored two of five LLM calls and said nothing."""
    proc = run_py(
        """
        import os, sys
        os.close(0); os.close(1)  # as a program started with `<&- >&-` finds them
        import aim_llama, aim_llama.auto
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=4)
        for i in range(2):
            llm.complete(f"before {i}")
        assert aim_llama.flush(60)
        try:
            os.write(1, b"a native library's log line\\n")
            sys.stderr.write("WROTE\\n")
        except OSError as exc:
            sys.stderr.write(f"EBADF {exc.errno == 9}\\n")
        for i in range(3):
            llm.complete(f"after {i}")
        """,
    )
    assert "EBADF True" in proc.stderr, proc.stderr
    assert "aim_llama" not in proc.stderr, proc.stderr
    run = only_run(repo)
    assert len(run.text("prompt", kind="llm")) == 5
    assert run.end_time is not None and not run.active


def test_foreign_bytes_in_the_writers_pipe_are_said_and_what_follows_is_counted(run_py, repo):
    """Bytes written into the writer's pipe by something else ended its input without a
    word: the writer now names it, and the app counts what was not stored."""
    proc = run_py(
        """
        import os, struct
        import aim_llama, aim_llama.auto
        from aim_llama import autoinstrument
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=4)
        for i in range(2):
            llm.complete(f"before {i}")
        assert aim_llama.flush(60)
        backend = autoinstrument._active.writer._backend
        os.write(backend._fd, struct.pack(">I", 10) + b"notapickle")
        for i in range(3):
            llm.complete(f"after {i}")
        """,
    )
    assert proc.stderr.count("unreadable data in the pipe from the application") == 1, proc.stderr
    lost = re.search(r"Aim writer closed: (\d+) records could not be stored", proc.stderr)
    assert lost is not None and int(lost.group(1)) >= 3, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["before 0", "before 1"]
    assert run.end_time is not None and not run.active


@pytest.mark.parametrize("text", [b"hello from a C library\n", b"ERROR:root:it failed\n"])
def test_plain_text_in_the_writers_pipe_is_said_at_once_and_what_follows_is_counted(run_py,
                                                                                     repo, text):
    """Plain text written into the writer's pipe (a C library's `printf`, a log line, on a
    reused descriptor) was read as a gigabyte-long frame: not said until the app exited, a
    flush waited its whole timeout, and the records sent after it were undercounted."""
    proc = run_py(
        f"        TEXT = {text!r}" + """
        import os, sys, time
        import aim_llama, aim_llama.auto
        from aim_llama import autoinstrument
        from llama_index.core.llms import MockLLM
        llm = MockLLM(max_tokens=4)
        llm.complete("before")
        assert aim_llama.flush(60)
        w = autoinstrument._active.writer
        backend = w._backend
        start = w._submitted
        import signal, threading
        os.kill(backend.proc.pid, signal.SIGSTOP)  # records sent behind the text: never read
        os.write(backend._fd, TEXT)
        sent, token = w._sent, w._sent_token
        for i in range(20):
            llm.complete(f"right after {i}")
        flushed = {}
        waiter = threading.Thread(target=lambda: flushed.update(ok=aim_llama.flush(120)))
        waiter.start()  # its flush mark goes into the pipe behind the text too
        deadline = time.monotonic() + 60
        while (w._sent == sent or w._sent_token == token) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(backend.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        waiter.join()
        print("FLUSH", flushed["ok"], round(time.monotonic() - resumed), flush=True)
        backend.proc.wait(timeout=60)  # the writer said so and finalized the run, at once
        print("WRITER GONE", file=sys.stderr, flush=True)
        llm.complete("after")  # refused: EPIPE
        assert not aim_llama.flush(5)
        print("AFTER", w._submitted - start, flush=True)
        """,
    )
    said = proc.stderr.find("unreadable data in the pipe from the application")
    assert said != -1 and proc.stderr.count("unreadable data in the pipe") == 1, proc.stderr
    assert f"not a frame aim-llama wrote: starts with {repr(text[:5])[:-1]}" in proc.stderr, \
        proc.stderr
    assert said < proc.stderr.index("WRITER GONE"), proc.stderr
    flush = re.search(r"FLUSH (\w+) (\d+)", proc.stdout)
    assert flush is not None and flush.group(1) == "False" and int(flush.group(2)) < 30, proc.stdout
    after = int(re.search(r"AFTER (\d+)", proc.stdout).group(1))
    lost = re.search(r"Aim writer closed: (\d+) records could not be stored", proc.stderr)
    assert lost is not None and int(lost.group(1)) >= after > 0, (after, proc.stderr)
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["before"]
    assert run.end_time is not None and not run.active


@pytest.mark.new_repo
def test_a_thread_writer_creating_the_repo_at_exit_keeps_its_run(run_py, repo, tmp_path):
    """`weakref.finalize`'s exit hook, registered after aim-llama's (Python 3.10: the thread
    writer's Aim made the first finalizer), ran first: it deleted the `TemporaryDirectory` of
    the new repo's database migration still running in the writer thread (the whole run lost),
    or finalized Aim's objects under the run being stored (no end time)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_py(
        """
        import atexit, glob, os, tempfile, time, weakref
        import llama_index.core
        # as on Python 3.10: no `weakref.finalize` made before aim-llama's activation
        atexit.unregister(weakref.finalize._exitfunc)
        weakref.finalize._registered_with_atexit = False
        import aim_llama
        assert aim_llama.instrument()
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=4).complete("at once")  # the writer thread starts: exit follows
        deadline = time.monotonic() + 30  # ... while it migrates the new repo's database
        pattern = os.path.join(tempfile.gettempdir(), "aim-llama-migrate-*")
        while not glob.glob(pattern) and time.monotonic() < deadline:
            time.sleep(0.001)
        """,
        env={"AIM_LLAMA_WRITER": "thread", "TMPDIR": str(scratch)},
    )
    assert "aim_llama" not in proc.stderr, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["at once"]
    assert run.end_time is not None and not run.active


DROP_PRIVILEGES_APP = """
import os, pickle, pwd, struct, sys, time
import aim_llama, aim_llama.auto
from llama_index.core.llms import MockLLM
MockLLM(max_tokens=4).complete("as root")
assert aim_llama.flush(60)  # the writer process runs, as root
fd = aim_llama.autoinstrument._active.writer._backend._fd
nobody = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
# from here on, code running as nobody (an attacker in the app) writes to the writer's pipe
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[1]}",))
data = pickle.dumps(Payload())
os.write(fd, struct.pack(">I", len(data)) + data)
time.sleep(2)
print("DONE", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or not Path("/proc/self/status").exists(), reason="needs root and /proc")
def test_a_root_writer_unpickles_nothing_once_the_app_dropped_privileges(repo, workdir,
                                                                         tmp_path):
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    marker = tmp_path / "pwned"
    proc = subprocess.run([sys.executable, "-c", DROP_PRIVILEGES_APP, str(marker)], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo), AIM_LLAMA_FLUSH_TIMEOUT="3"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    assert not marker.exists(), "the root writer ran code the unprivileged app sent"
    assert "changed its user (it dropped root privileges)" in proc.stderr, proc.stderr
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["as root"]
    assert run.end_time is not None  # the root writer finalized what it had


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or not Path("/proc/self/status").exists(), reason="needs root and /proc")
def test_what_a_root_writer_cannot_read_after_the_app_left_is_counted_and_said(repo, workdir):
    """An exit that reaches the flush timeout (a writer far behind) leaves records in the
    pipe. A root writer cannot vouch for a sender that is gone, so it does not unpickle them:
    it now counts them (from the chunk headers) and says how many; they were lost unsaid."""
    proc = start(repo, workdir, "400", "stopped-writer-exit", "--flush-timeout", "1")
    writer_pid = int(wait_for(proc, "WRITER").split()[1])
    assert proc.wait(timeout=60) == 0  # (the stopped writer holds the app's stderr open)
    os.kill(writer_pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)  # (until the writer process is gone too)
    assert "0 records not handed to it" in err, err
    said = re.search(r"is gone: (\d+) records it left in the pipe are not stored", err)
    assert said, err
    run = only_run(repo)
    stored = values(run, kind="t0")
    assert stored == [float(i) for i in range(len(stored))] and len(stored) >= 200
    assert len(stored) + int(said.group(1)) == 400  # every record accounted for
    assert run.end_time is not None and not run.active


def test_a_startup_banner_on_stdout_does_not_break_the_writers_replies(run_py, repo, tmp_path):
    """A `sitecustomize.py` (or `.pth`) that prints runs in the writer process too, before it
    can keep its stdout private: the banner is skipped, never read as a reply (before, every
    flush waited out its timeout and the exit reported a false loss)."""
    site = tmp_path / "banner"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('Welcome to this machine!')\n")
    proc = run_py(
        """
        import time
        import aim_llama
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        for i in range(20):
            MockLLM(max_tokens=3).complete(f"call {i}")
        started = time.monotonic()
        print("FLUSHED", aim_llama.flush(timeout=8), round(time.monotonic() - started, 2),
              aim_llama.current_run_hash() is not None, flush=True)
        """,
        env={"PYTHONPATH": str(site)},
    )
    flushed = proc.stdout.split("FLUSHED ")[1].split()
    assert flushed[0] == "True" and flushed[2] == "True", proc.stdout + proc.stderr
    assert "not stored" not in proc.stderr and "unexpectedly" not in proc.stderr, proc.stderr
    run = only_run(repo)
    assert len(run.text("prompt", kind="llm")) == 20 and run.end_time is not None


def test_an_apps_own_ctrl_c_handler_runs_at_once(run_py):
    """The app's SIGINT handler is its own business: no flush before it (with a server that
    is unreachable, that flush held every Ctrl-C for the whole flush timeout)."""
    proc = run_py(
        """
        import os, signal, time
        got = []
        signal.signal(signal.SIGINT, lambda s, f: got.append(time.monotonic()))
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        for i in range(3):
            MockLLM(max_tokens=3).complete(f"call {i}")
        sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        print("HANDLED AFTER", round(got[0] - sent, 3), flush=True)
        """,
        env={"AIM_REPO": "aim://127.0.0.1:9", "AIM_LLAMA_FLUSH_TIMEOUT": "3"},
        use_repo=False,
    )
    assert float(proc.stdout.split("HANDLED AFTER ")[1].split()[0]) < 0.5, proc.stdout


TERM_THEN_CTRL_C = """
import os, signal, threading, time

def term_then_ctrl_c(gap):
    # SIGTERM after 0.2 s (its flush waits for a server that is not there), Ctrl-C `gap` later
    def later():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(gap)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=later, daemon=True).start()
"""


def test_ctrl_c_during_a_sigterm_flush_ends_it_as_sigterm_would(workdir):
    """A Ctrl-C that stops the wait of a SIGTERM's flush (a server that is not there) lets the
    SIGTERM go on: the process dies of it at once, with no KeyboardInterrupt traceback; the
    writer process still says what was lost."""
    code = TERM_THEN_CTRL_C + textwrap.dedent("""
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=3).complete("one")
        print("GO", flush=True)
        term_then_ctrl_c(0.8)
        time.sleep(30)
        print("NOT KILLED", flush=True)
        """)
    err = workdir / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=workdir, stdout=subprocess.PIPE, stderr=stderr,
            text=True, env=clean_env(AIM_REPO="aim://127.0.0.1:9", AIM_LLAMA_FLUSH_TIMEOUT="4"))
        assert proc.stdout.readline() == "GO\n", err.read_text()
        started = time.monotonic()  # (start-up, slow on a loaded machine, is not timed)
        assert proc.wait(timeout=60) == -signal.SIGTERM, err.read_text()
        # the 1 s before Ctrl-C and dying, not the 4 s flush timeout that follows SIGTERM
        assert time.monotonic() - started < 3.5
        assert "NOT KILLED" not in proc.stdout.read()
    deadline = time.monotonic() + 20  # the writer process reports once its deadline passed
    while "they are lost" not in err.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "records were not delivered" in err.read_text(), err.read_text()
    assert "Traceback" not in err.read_text(), err.read_text()


def test_ctrl_c_during_the_flush_in_front_of_an_apps_sigterm_handler_still_reaches_the_app(
        run_py):
    """The flush in front of the application's SIGTERM handler is cut short by a Ctrl-C: the
    handler runs, and the Ctrl-C still reaches the application as KeyboardInterrupt."""
    proc = run_py(
        TERM_THEN_CTRL_C + textwrap.dedent("""
        ran = []
        signal.signal(signal.SIGTERM, lambda s, f: ran.append("handler"))
        import aim_llama.auto
        from llama_index.core.llms import MockLLM
        MockLLM(max_tokens=3).complete("one")
        term_then_ctrl_c(0.6)
        try:
            time.sleep(10)
            print("LOOP ENDED NORMALLY", flush=True)
        except KeyboardInterrupt:
            print("KEYBOARD INTERRUPT", ran, flush=True)
        """),
        env={"AIM_REPO": "aim://127.0.0.1:9", "AIM_LLAMA_FLUSH_TIMEOUT": "1"},
        use_repo=False, check=False,
    )
    assert "KEYBOARD INTERRUPT ['handler']" in proc.stdout, proc.stdout + proc.stderr


UNREADABLE_APP = """
import sys
from aim_llama.aimrun import RunConfig
from aim_llama.records import Track
from aim_llama.writer import Writer

class Tagged(str):  # only this program has the class, and the value carries state
    pass

odd = Tagged("tagged")
odd.source = "app"
w = Writer(RunConfig(repo=sys.argv[1], system_tracking_interval=None, log_system_params=False))
for i in range(3):
    w.submit(Track("value", float(i), "metric", {"kind": "t"}, i))
w.submit(Track("note", odd, "text", {"kind": "t"}, 0))
for i in range(3, 6):
    w.submit(Track("value", float(i), "metric", {"kind": "t"}, i))
print("FLUSH", w.flush(30), w.flush(30), flush=True)
print("CLOSED", w.close(), w.lost, flush=True)
"""


def test_a_record_the_writer_process_cannot_read_is_counted_and_the_others_stored(repo, workdir):
    """A value of a class only the application has, which the writer process cannot rebuild:
    that record is counted lost (flush says so, the exit summary counts it, one error line)
    and the records before and after it are stored — it once ended recording, silently."""
    proc = subprocess.run([sys.executable, "-c", UNREADABLE_APP, str(repo)], cwd=workdir,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FLUSH False True" in proc.stdout and "CLOSED True 1" in proc.stdout, proc.stdout
    assert proc.stderr.count("could not be read by the Aim writer") == 1, proc.stderr
    assert "1 records could not be stored" in proc.stderr, proc.stderr
    run = only_run(repo)
    assert run.metric("value", kind="t") == [(i, float(i)) for i in range(6)]
    assert run.end_time is not None


def test_records_made_after_close_are_said_once_and_counted_by_a_later_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """README, failure modes: not stored; one warning when the first one comes; a later
    `close()` (the exit hook after SIGTERM's) gives the count."""
    import logging

    from aim_llama.aimrun import RunConfig
    from aim_llama.log import reset_reported
    from aim_llama.records import Track
    from aim_llama.writer import Writer

    reset_reported()
    repo = tmp_path / "repo"
    writer = Writer(RunConfig(repo=str(repo), system_tracking_interval=None,
                              log_system_params=False), backend="thread")
    writer.submit(Track("x", 1.0, "metric", {"kind": "t"}))
    writer.close()
    with caplog.at_level(logging.WARNING, logger="aim_llama"):
        for i in range(3):
            writer.submit(Track("x", 2.0 + i, "metric", {"kind": "t"}))
        said = [r.getMessage() for r in caplog.records]
        assert len([m for m in said if "writer was closed" in m]) == 1, said
        assert any(m.startswith("records made after aim-llama's writer was closed") and
                   "are not stored" in m for m in said), said
        writer.close()
        said = [r.getMessage() for r in caplog.records]
    assert "3 records made after aim-llama's writer was closed were not stored" in said, said
    assert writer.after_close == 3
    assert read_run(repo, writer.run_hash).metric("x", kind="t") == [(0, 1.0)]


LOGS_AFTER_DEATH_APP = textwrap.dedent("""
    import os, signal, time
    from aim_llama.aimrun import RunConfig
    from aim_llama.records import TerminalOutput
    from aim_llama.writer import Writer

    writer = Writer(RunConfig(repo=os.environ["AIM_REPO"], app_pid=os.getpid(),
                              system_tracking_interval=None, log_system_params=False))
    writer.submit(TerminalOutput("line 0\\nline 1\\n"))
    assert writer.flush(60)
    backend = writer._backend
    os.kill(backend.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while writer._backend is backend and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.submit(TerminalOutput("line 2\\n"))
    print("FLUSH", writer.flush(60), "RESTARTS", writer.restarts, flush=True)
    writer.close()
""")


def test_terminal_lines_after_a_writer_process_death_follow_the_earlier_ones(repo, workdir):
    """A new writer process continues the run's Logs after its last line, as it continues
    every other sequence: the lines the dead one stored are not overwritten."""
    proc = subprocess.run([sys.executable, "-c", LOGS_AFTER_DEATH_APP], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FLUSH True RESTARTS 1" in proc.stdout, proc.stderr
    run = only_run(repo)
    assert terminal_lines(repo, run.hash) == ["line 0", "line 1", "line 2"]


NICE_APP = textwrap.dedent("""
    import os
    from aim_llama.aimrun import RunConfig
    from aim_llama.records import Track
    from aim_llama.writer import Writer

    writer = Writer(RunConfig(repo=os.environ["AIM_REPO"], app_pid=os.getpid(),
                              system_tracking_interval=None, log_system_params=False))
    writer.submit(Track("value", 1.0, "metric", {"kind": "t"}))
    assert writer.flush(60)
    pid = writer._backend.proc.pid
    print("NICE", os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, pid),
          flush=True)
    writer.close()
""")


def test_the_writer_process_yields_the_cpu_to_the_application(repo, workdir):
    """The writer process runs at `nice 10` (and so do the RocksDB threads it starts): on a
    busy machine the application keeps its CPU."""
    proc = subprocess.run([sys.executable, "-c", NICE_APP], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    app, writer = (int(n) for n in proc.stdout.split("NICE")[1].split())
    assert writer == min(19, app + 10), proc.stdout


FLUSH_LATENCY_APP = textwrap.dedent("""
    import os, time
    from aim_llama.aimrun import RunConfig
    from aim_llama.records import Track
    from aim_llama.writer import Writer

    writer = Writer(RunConfig(repo=os.environ["AIM_REPO"], app_pid=os.getpid(),
                              system_tracking_interval=None, log_system_params=False))
    writer.submit(Track("value", 0.0, "metric", {"kind": "t"}))
    assert writer.flush(60)  # (the writer process has started and opened the run)
    started = time.monotonic()
    for i in range(1, 11):
        writer.submit(Track("value", float(i), "metric", {"kind": "t"}))
        assert writer.flush(60)
    print("TEN_FLUSHES", time.monotonic() - started, flush=True)
    writer.close()
""")


def test_a_flush_is_stored_at_once_not_after_the_writers_half_second(repo, workdir):
    """The writer process stores what arrives within half a second as one batch, but a batch
    that carries a flush() at once: ten flushes in a row must not take ten half-seconds."""
    proc = subprocess.run([sys.executable, "-c", FLUSH_LATENCY_APP], cwd=workdir,
                          env=clean_env(AIM_REPO=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    took = float(proc.stdout.split("TEN_FLUSHES")[1].split()[0])
    # (a flush that waited like other batches: ten times COALESCE, ~4.5 s measured; here
    # ~0.5 s, with room for a loaded CI machine)
    assert took < 0.6 * 10 * COALESCE, proc.stdout


def test_aim_llamas_threads_block_sigpipe_as_well_as_the_process_signals() -> None:
    """The sender thread writes to the writer process's pipe: with SIGPIPE blocked there, a
    writer that died makes the write fail with EPIPE instead of killing an application that
    restored SIGPIPE's default action (`prog | head`)."""
    import threading

    from aim_llama.lifecycle import start_background

    masks: list[set[int]] = []
    thread = threading.Thread(
        target=lambda: masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, []))))
    start_background(thread)
    thread.join()
    assert {signal.SIGPIPE, signal.SIGTERM, signal.SIGINT} <= masks[0]
    assert signal.SIGPIPE not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (ours only)
