"""The writer's storage path (RunSink) against Aim's own `run.track`, read back through Aim."""

from __future__ import annotations

from pathlib import Path

from aim_llama.aimrun import RunConfig, RunSink
from aim_llama.records import LogError, Param, Record, Track

# (name, value, context kind, step): out-of-order steps, ints into a float sequence, a new
# minimum and maximum after the first value, texts.
SERIES = [
    ("latency_ms", 5.0, "llm", 0), ("latency_ms", 7.5, "llm", 1), ("latency_ms", 2.0, "llm", 3),
    ("latency_ms", 9.0, "llm", 2), ("latency_ms", 4, "llm", 4), ("latency_ms", 1.0, "retrieve", 0),
    ("latency_ms", 3.0, "retrieve", 1), ("tokens", 10, "llm", 0), ("tokens", 12, "llm", 1),
    ("prompt", "first", "llm", 0), ("prompt", "second", "llm", 1),
]


def _reference_run(repo: Path) -> str:
    """SERIES tracked by Aim's own `run.track` into `repo`; the run's hash."""
    from aim import Run, Text

    reference = Run(repo=str(repo), system_tracking_interval=None, log_system_params=False)
    for name, value, kind, step in SERIES:
        reference.track(Text(value) if isinstance(value, str) else value, name=name, step=step,
                        context={"kind": kind})
    run_hash = str(reference.hash)
    reference.close()
    return run_hash


def _summary(repo: Path, run_hash: str) -> dict[tuple[str, str], dict[str, object]]:
    """Every sequence's summary keys (what Aim's runs table shows) and metric values."""
    from aim import Repo

    from aimread import _index

    aim_repo = Repo.from_path(str(repo))
    _index(aim_repo, run_hash)  # as `aim up` does: a finished run is read through the index
    aim_repo.container_pool.clear()
    run = aim_repo.get_run(run_hash)
    out: dict[tuple[str, str], dict[str, object]] = {}
    for ctx_idx, traces in run.meta_run_tree.collect("traces").items():
        kind = run.idx_to_ctx(ctx_idx).to_dict().get("kind", "")
        for name, info in traces.items():
            out[(name, kind)] = {k: (str(v) if k in ("first", "last") else v)
                                 for k, v in info.items()}
    for seq in run.metrics():
        out[(seq.name, seq.context.to_dict()["kind"])]["values"] = list(
            zip(*seq.values.sparse_list(), strict=True))
    return out


def test_fast_tracking_stores_what_aims_own_track_stores(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    sink = RunSink(RunConfig(repo=str(repo), system_tracking_interval=None,
                             log_system_params=False))
    # two batches: summary keys are written at the end of each
    sink.apply([Track(n, v, "text" if isinstance(v, str) else "metric", {"kind": k}, s)
                for n, v, k, s in SERIES[:4]])
    sink.apply([Track(n, v, "text" if isinstance(v, str) else "metric", {"kind": k}, s)
                for n, v, k, s in SERIES[4:]])
    assert sink._fast is not None, "the fast path was not used"
    fast_hash = sink.run_hash
    assert sink.close() and sink.lost == 0

    ref_hash = _reference_run(repo)

    fast, ref = _summary(repo, fast_hash), _summary(repo, ref_hash)
    assert set(fast) == set(ref) == {("latency_ms", "llm"), ("latency_ms", "retrieve"),
                                     ("tokens", "llm"), ("prompt", "llm")}
    for key, expected in ref.items():
        assert fast[key] == expected, key
    assert fast[("latency_ms", "llm")]["last_step"] == 4
    assert fast[("latency_ms", "llm")]["max"] == 9.0 and fast[("latency_ms", "llm")]["min"] == 2.0


def _series_items(repo: Path, run_hash: str) -> dict[bytes, bytes]:
    """Every key and value of a run's series container, as stored in RocksDB."""
    from aim.storage.rockscontainer import RocksContainer

    container = RocksContainer(str(repo / ".aim" / "seqs" / "chunks" / run_hash), read_only=True)
    own = run_hash.encode()
    return {bytes(k).replace(own, b"<run>"): bytes(v) for k, v in container.items()}


def test_fast_tracking_writes_the_same_bytes_as_aim(tmp_path: Path) -> None:
    """Byte for byte, apart from the wall-clock `time` of each value."""
    repo = tmp_path / "repo"
    sink = RunSink(RunConfig(repo=str(repo), system_tracking_interval=None,
                             log_system_params=False))
    records = [Track(n, v, "text" if isinstance(v, str) else "metric", {"kind": k}, s)
               for n, v, k, s in SERIES]
    sink.apply(records[:3])
    sink.apply(records[3:])
    fast_hash = sink.run_hash
    assert sink.close()

    ref_hash = _reference_run(repo)

    from aim.storage import encoding

    time_marker = encoding.encode_path(("time",))[:-1]
    fast, ref = _series_items(repo, fast_hash), _series_items(repo, ref_hash)
    assert len(fast) > 4 * len(SERIES)
    assert set(fast) == set(ref)
    differing = {k for k in fast if fast[k] != ref[k]}
    assert differing and all(time_marker in k for k in differing)  # only the timestamps


INIT_RACE = (
    "import sys\nfrom aim_llama.aimrun import ensure_repo_initialized\nfrom aim import Repo\n"
    "ensure_repo_initialized(sys.argv[1])\nRepo.from_path(sys.argv[1])\nprint('opened')\n"
)


def test_processes_racing_to_create_one_repo_all_open_it_and_leave_no_lock_file(
        tmp_path: Path) -> None:
    """Workers that start together on a new repo all open it (Aim alone would call the repo
    out of date to those arriving mid-initialization), and the lock that serialized them is gone."""
    import subprocess
    import sys

    from conftest import clean_env

    lock_dir = tmp_path / "tmp"
    lock_dir.mkdir()
    repo = tmp_path / "new-repo"
    env = clean_env(TMPDIR=str(lock_dir))
    procs = [subprocess.Popen([sys.executable, "-c", INIT_RACE, str(repo)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(5)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, [err[-2000:] for _, err in outputs]
    assert all(out.strip() == "opened" for out, _ in outputs)
    assert (repo / ".aim" / "VERSION").read_text().strip()
    assert sorted(p.name for p in lock_dir.iterdir() if p.name.startswith("aim-llama-init")) == []


def test_a_run_opened_when_no_thread_may_start_is_stored_and_finalized(repo: Path,
                                                                         monkeypatch) -> None:
    """Python 3.12+ refuses new threads at interpreter shutdown, which is when the thread writer
    of a short-lived program opens its run; Aim's Run starts two status-reporter threads and
    aim-llama one for system metrics (on by default). Here every thread start is refused the way
    3.12 does it: the run must still be written, its log entry too, and be closed."""
    import threading

    from aim import Repo

    from aimread import read_run

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    sink = RunSink(RunConfig(repo=str(repo), log_system_params=False))  # default stats interval
    records: list[Record] = [
        Track(n, v, "text" if isinstance(v, str) else "metric", {"kind": k}, s)
        for n, v, k, s in SERIES
    ]
    records.append(LogError("llm failed: RuntimeError: model is down", {"operation": "llm"}))
    monkeypatch.setattr(threading.Thread, "start", refuse)
    sink.apply(records)
    assert sink.failed is None and sink.lost == 0 and sink.stored == len(records)
    assert sink.close()
    monkeypatch.undo()
    run = read_run(str(repo), sink.run_hash)
    assert run.end_time is not None and not run.active
    assert [v for _, v in run.metric("latency_ms", kind="llm")] == [5.0, 7.5, 9.0, 2.0, 4.0]
    assert [t for _, t in run.text("prompt", kind="llm")] == ["first", "second"]
    logs = Repo.from_path(str(repo)).get_run(sink.run_hash).get_log_records()
    assert logs is not None
    _steps, (values, *_rest) = logs.data.items_list()
    assert ["model is down" in str((v[0] if isinstance(v, list) else v).json()) for v in values] \
        == [True]


def test_strings_utf8_cannot_encode_in_params_and_contexts_are_stored(tmp_path: Path) -> None:
    """A model or tool name decoded from bad bytes (lone surrogates) must not cost its record:
    the surrogates become U+FFFD in parameters and contexts, as they do in texts."""
    from aimread import read_run

    repo = tmp_path / "repo"
    sink = RunSink(RunConfig(repo=str(repo), system_tracking_interval=None, log_system_params=False))
    sink.apply([Param("llm_models", {"model\ud800": {"calls": 1}}),
                Track("latency_ms", 2.0, "metric", {"kind": "tool", "tool": "gen\ud800tool"}, 0)])
    sink.close()
    assert sink.lost == 0 and sink.run_hash is not None
    run = read_run(repo, sink.run_hash)
    assert run.params["llm_models"] == {"model\ufffd": {"calls": 1}}
    assert run.metric("latency_ms", kind="tool", tool="gen\ufffdtool") == [(0, 2.0)]


def test_a_chunk_the_writer_cannot_read_is_counted_lost_and_the_rest_is_stored(
        tmp_path: Path) -> None:
    """Values of classes only the application has (defined in its `__main__`): a plain `str`
    subclass is read as its `str`; a chunk that still cannot be unpickled is skipped and its
    records counted lost — the chunks around it are stored (it once ended the whole stream)."""
    import sys
    import types

    from aim_llama import wire
    from aimread import read_run

    module = types.ModuleType("app_only")
    sys.modules["app_only"] = module

    class Plain(str):
        pass

    class Tagged(str):
        pass

    for cls in (Plain, Tagged):
        cls.__module__, cls.__qualname__ = "app_only", cls.__name__
        setattr(module, cls.__name__, cls)
    tagged = Tagged("with state")
    tagged.source = "app"  # type: ignore[attr-defined]  (pickled as state: no plain reading)
    first = wire.dumps([Track("prompt", Plain("plain subclass"), "text", {"kind": "llm"}, 0)])
    bad = wire.dumps([Track("prompt", tagged, "text", {"kind": "llm"}, 1),
                      Track("latency_ms", 1.0, "metric", {"kind": "llm"}, 1)])
    last = wire.dumps([Track("prompt", "after", "text", {"kind": "llm"}, 2)])
    del sys.modules["app_only"]  # as in the writer process
    records = wire.loads_many(first + bad + last)
    assert records.unreadable == 2 and len(records) == 2
    assert type(records[0].value) is str

    repo = tmp_path / "repo"
    sink = RunSink(RunConfig(repo=str(repo), system_tracking_interval=None, log_system_params=False))
    sink.apply(records)
    sink.close()
    assert sink.lost == 2
    run = read_run(repo, str(sink.run_hash))
    assert run.text("prompt", kind="llm") == [(0, "plain subclass"), (2, "after")]


def test_a_batch_the_repo_refuses_is_counted_lost_not_stored(tmp_path, monkeypatch) -> None:
    """The repo stops taking writes at a batch's commit (a full disk): that batch and every
    later record are lost, and none of them may still count as stored (the exit summary is
    what the writer received minus what it stored)."""
    from aim.storage.rockscontainer import RocksContainer

    from aim_llama.aimrun import RunConfig, RunSink
    from aim_llama.records import Track

    sink = RunSink(RunConfig(repo=str(tmp_path / "repo"), system_tracking_interval=None,
                             log_system_params=False))
    sink.apply([Track("value", float(i), "metric", {"kind": "t"}, i) for i in range(3)])
    assert (sink.stored, sink.lost) == (3, 0)

    def refuse(container, batch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RocksContainer, "_aim_llama_commit", staticmethod(refuse))
    sink.apply([Track("value", float(i), "metric", {"kind": "t"}, i) for i in range(3, 8)])
    sink.apply([Track("value", 8.0, "metric", {"kind": "t"}, 8)])
    assert sink.failed is not None and "No space left on device" in sink.failed
    assert (sink.confirmed, sink.lost) == (3, 6)
