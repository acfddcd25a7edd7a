"""Load aim-llama's writer directly (a child of overhead.py): exit flush and memory under a burst.

    python benchmarks/writer_load.py flush --records 10000 --out result.json
    python benchmarks/writer_load.py burst --records 100000 --out result.json

Both start aim-llama the way an application does (`import aim_llama.auto`, then LlamaIndex),
start the writer with one record and a flush (so the writer process and the Aim run exist),
then submit `--records` fresh records through the same `submit` the handler uses. Records
copy the shape of one mock RAG query as the handler maps it (17 records: 6 texts of about
3 KB in all, 11 metrics), each with its own strings and context dict, as the handler makes them.

* flush: queue the records, note the wall time, return: the parent times how long the process
  takes to exit (atexit flush + finalize) and checks every record reached the repo.
* burst: submit as fast as possible; report RSS before and the peak (VmHWM, reset just before
  the burst through /proc/self/clear_refs) while the writer drains; drops as counted in-process.
"""

from __future__ import annotations

import argparse
import json
import re
import time

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=("flush", "burst"))
parser.add_argument("--records", type=int, required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

# isort: off
import aim_llama.auto  # noqa: F401  (first, as an application would)
import llama_index.core  # noqa: F401  (the import hook instruments here)
from aim_llama import autoinstrument
from aim_llama.records import Track
# isort: on

active = autoinstrument._active
assert active is not None, "aim-llama did not instrument"
submit = active.writer.submit

_TEXT = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 40)
# (name, kind, context kind, text length) of one query as recorded by the handler.
SHAPE = [
    ("embedded_texts", "metric", "embedding", 0),
    ("latency_ms", "metric", "embedding", 0),
    ("retrieved_nodes", "metric", "retrieve", 0),
    ("top_score", "metric", "retrieve", 0),
    ("latency_ms", "metric", "retrieve", 0),
    ("chunk", "text", "chunking", 860),
    ("latency_ms", "metric", "chunking", 0),
    ("chunk", "text", "chunking", 860),
    ("latency_ms", "metric", "chunking", 0),
    ("latency_ms", "metric", "templating", 0),
    ("prompt", "text", "llm", 1060),
    ("response", "text", "llm", 80),
    ("latency_ms", "metric", "llm", 0),
    ("latency_ms", "metric", "synthesize", 0),
    ("question", "text", "query", 60),
    ("answer", "text", "query", 80),
    ("latency_ms", "metric", "query", 0),
]
TEXT_SHARE = sum(1 for s in SHAPE if s[1] == "text") / len(SHAPE)


def record(i: int) -> Track:
    name, kind, ctx, length = SHAPE[i % len(SHAPE)]
    if kind == "text":
        return Track("b_" + name, f"{i} {_TEXT[:length]}", "text", {"kind": ctx})
    return Track("b_" + name, float(i % 1000) * 0.5, "metric", {"kind": ctx})


def status(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    return int(match.group(1)) * 1024 if match else -1


def writer_status(field: str) -> int | None:
    """A /proc status field (bytes) of aim-llama's writer process, if there is one."""
    backend = getattr(active.writer, "_backend", None)
    proc = getattr(backend, "proc", None)
    if proc is None:
        return None
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


# Start the writer (process + run) before measuring anything.
submit(Track("b_start", 1, "metric", {"kind": "bench"}))
assert autoinstrument.flush(60), "writer did not start"

result: dict[str, object] = {"mode": args.mode, "records": args.records,
                             "writer": active.writer.backend_name, "text_share": TEXT_SHARE}
if args.mode == "flush":
    t0 = time.perf_counter()
    for i in range(args.records):
        submit(record(i))
    result["queue_s"] = time.perf_counter() - t0
    result["queued_wall"] = time.time()
    result["dropped"] = active.writer.dropped
else:
    rss_before = status("VmRSS")
    writer_rss_before = writer_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    for i in range(args.records):
        submit(record(i))
    submit_s = time.perf_counter() - t0
    rss_after_submit = status("VmRSS")
    drained = autoinstrument.flush(120)
    drain_s = time.perf_counter() - t0
    result.update(
        rss_before=rss_before,
        rss_after_submit=rss_after_submit,
        rss_peak=status("VmHWM"),
        hwm_reset=hwm_reset,
        submit_s=submit_s,
        submit_per_s=args.records / submit_s,
        drained=drained,
        drain_s=drain_s,
        dropped=active.writer.dropped,
        writer_process_rss_before=writer_rss_before,
        writer_process_peak_rss=writer_status("VmHWM"),
    )
with open(args.out, "w") as fh:
    json.dump(result, fh)
