"""What users see: a real `aim up` over a repo written by aim-llama, queried through the HTTP API
its web UI uses (run search, run info, text search, metric batch)."""

from __future__ import annotations

import json
import struct
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from conftest import APPS

pytest_plugins = ("aimserver",)  # the aim_process fixture


def _pairs(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Split the UI's streaming format: (u32 key length, key, u32 value length, value)*."""
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("I", data, i)
        key = data[i + 4 : i + 4 + n]
        i += 4 + n
        (m,) = struct.unpack_from("I", data, i)
        value = data[i + 4 : i + 4 + m]
        i += 4 + m
        yield key, value


def stream(base: str, path: str) -> dict[str, Any]:
    """GET a streaming search endpoint and decode it with Aim's own tree decoder (as the UI does)."""
    from aim.storage.treeutils import decode_tree

    with urllib.request.urlopen(base + path, timeout=30) as response:
        tree: dict[str, Any] = decode_tree(_pairs(response.read()))
    return {k: v for k, v in tree.items() if not k.startswith("progress_")}


def call(base: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_aim_up_lists_the_run_params_texts_and_metrics(run_py, repo, aim_process):
    proc = run_py(script=APPS / "rag.py", args=["3"], env={
        "AIM_EXPERIMENT": "ui-check", "AIM_RUN_PARAMS": '{"llm": {"model": "mock"}, "top_k": 2}',
    })
    pid = int(proc.stdout.split("DONE ")[1].split()[0])
    ui = aim_process("up", repo=repo)
    base = f"{ui.http}/api"

    runs: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while not runs and time.monotonic() < deadline:  # aim up indexes in the background
        runs = stream(base, "/runs/search/run/?report_progress=false")
        time.sleep(0.2 if not runs else 0)
    assert len(runs) == 1, runs
    ((run_hash, listed),) = runs.items()
    assert listed["props"]["experiment"]["name"] == "ui-check"
    assert listed["params"]["llm"] == {"model": "mock"} and listed["params"]["top_k"] == 2
    assert listed["params"]["aim_llama"]["pid"] == pid
    listed_metrics = {(t["name"], t["context"].get("kind")) for t in listed["traces"]["metric"]}
    assert ("latency_ms", "llm") in listed_metrics

    # The run page.
    info = call(base, f"/runs/{run_hash}/info/")
    assert info["props"]["active"] is False and info["props"]["end_time"]
    assert info["params"]["top_k"] == 2
    texts = {(t["name"], t["context"].get("kind")) for t in info["traces"]["texts"]}
    assert {("prompt", "llm"), ("response", "llm")} <= texts

    # The Text explorer, filtered to this run with Aim's query language.
    query = urllib.parse.quote(f'run.hash == "{run_hash}" and run.experiment == "ui-check"')
    found = stream(base, f"/runs/search/texts/?q={query}&report_progress=false")
    traces = {(t["name"], t["context"].get("kind")): t for t in found[run_hash]["traces"]}
    prompts = [step[0]["data"] for step in traces[("prompt", "llm")]["values"]]
    responses = [step[0]["data"] for step in traces[("response", "llm")]["values"]]
    assert len(prompts) == 3 and len(responses) == 3
    for i, prompt in enumerate(prompts):
        assert f"question {i}: what about topic {i % 3}?" in prompt
    assert all(r.strip() for r in responses)

    # The Metrics explorer's batch endpoint: one latency point per LLM call, all positive.
    batch = call(base, f"/runs/{run_hash}/metric/get-batch/",
                 [{"name": "latency_ms", "context": {"kind": "llm"}}])
    (series,) = batch
    assert series["iters"] == [0, 1, 2]
    assert len(series["values"]) == 3 and all(v > 0 for v in series["values"])
