"""Read an Aim repo back the way Aim's UI sees it (used by the tests and the benchmark).

With Aim 3.29 a finished run is visible to `Repo`/`Run` readers only once it is indexed —
what `aim up` does in the background — so we index it first, then read through the public SDK.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def repo_root(path: str | Path) -> Path:
    """The directory holding `.aim` for a repo path given either way."""
    p = Path(path)
    return p.parent if p.name == ".aim" else p


def run_hashes(path: str | Path) -> list[str]:
    """Hashes of every run written to the repo, indexed or not."""
    chunks = repo_root(path) / ".aim" / "meta" / "chunks"
    if not chunks.is_dir():
        return []
    return sorted(p.name for p in chunks.iterdir())


@dataclass
class RunData:
    hash: str
    params: dict[str, Any]
    experiment: str | None
    end_time: float | None
    active: bool
    metrics: dict[tuple[str, tuple[tuple[str, Any], ...]], list[tuple[int, float]]] = field(
        default_factory=dict
    )
    texts: dict[tuple[str, tuple[tuple[str, Any], ...]], list[tuple[int, str]]] = field(
        default_factory=dict
    )
    # (samples counted, (low, high)) per step: what Aim's distributions view draws
    distributions: dict[tuple[str, tuple[tuple[str, Any], ...]],
                        list[tuple[int, tuple[int, tuple[float, float]]]]] = field(
        default_factory=dict
    )
    logs: list[str] = field(default_factory=list)

    def metric(self, name: str, **context: Any) -> list[tuple[int, float]]:
        return self.metrics.get((name, tuple(sorted(context.items()))), [])

    def text(self, name: str, **context: Any) -> list[tuple[int, str]]:
        return self.texts.get((name, tuple(sorted(context.items()))), [])

    def distribution(self, name: str, **context: Any
                     ) -> list[tuple[int, tuple[int, tuple[float, float]]]]:
        return self.distributions.get((name, tuple(sorted(context.items()))), [])

    def sequences(self) -> set[tuple[str, tuple[tuple[str, Any], ...]]]:
        return set(self.metrics) | set(self.texts) | set(self.distributions)


def _index(repo: Any, run_hash: str) -> None:
    from aim.sdk.index_manager import RepoIndexManager

    manager = RepoIndexManager.get_index_manager(repo)
    for attempt in range(20):
        try:
            manager.index(run_hash)
            return
        except Exception:  # aimrocks RocksIOError while the writer still holds a lock
            if attempt == 19:
                raise
            time.sleep(0.25)


def read_run(path: str | Path, run_hash: str, with_texts: bool = True) -> RunData:
    """Index then read one run: params, metrics (step-ordered), texts, finalization state."""
    from aim import Repo

    from aim_llama.aimexit import patch_aim_exit_cleanup

    patch_aim_exit_cleanup()  # Python 3.12: Aim's own exit cleanup cannot start its thread
    repo = Repo.from_path(str(repo_root(path)))
    _index(repo, run_hash)
    repo.container_pool.clear()
    run = repo.get_run(run_hash)
    assert run is not None, f"run {run_hash} not readable"
    params = run[...]
    data = RunData(
        hash=run_hash,
        params=params,
        experiment=run.experiment,
        end_time=run.end_time,
        active=run.active,
    )
    for metric in run.metrics():
        steps, (values, _epochs, _times) = metric.data.items_list()
        ctx = tuple(sorted(metric.context.to_dict().items()))
        data.metrics[(metric.name, ctx)] = list(zip(steps, values, strict=False))
    if with_texts:
        query = f'run.hash == "{run_hash}"'
        for seq in repo.query_texts(query, report_mode=0).iter():
            ctx = tuple(sorted(seq.context.to_dict().items()))
            steps, (values, _e, _t) = seq.data.items_list()
            texts = []
            for step, value in zip(steps, values, strict=False):
                item = value[0] if isinstance(value, list) else value
                texts.append((int(step), str(getattr(item, "data", item))))
            data.texts[(seq.name, ctx)] = texts
        for seq in repo.query_distributions(query, report_mode=0).iter():
            ctx = tuple(sorted(seq.context.to_dict().items()))
            steps, (values, _e, _t) = seq.data.items_list()
            data.distributions[(seq.name, ctx)] = [
                (int(step), (round(float(sum(d.weights))), tuple(d.range)))
                for step, d in zip(steps, values, strict=False)
            ]
    return data


def read_all(path: str | Path, with_texts: bool = True) -> list[RunData]:
    """Every run in the repo, read back."""
    return [read_run(path, h, with_texts) for h in run_hashes(path)]


def terminal_lines(path: str | Path, run_hash: str) -> list[str]:
    """The run's captured terminal output (the UI's Logs tab), one entry per line."""
    from aim import Repo

    run = Repo.from_path(str(repo_root(path))).get_run(run_hash)
    assert run is not None, f"run {run_hash} not readable"
    seq = run.get_terminal_logs()
    if seq is None:
        return []
    _steps, (values, *_rest) = seq.data.items_list()
    return [str(getattr(v[0] if isinstance(v, list) else v, "data", v)) for v in values]
