"""The writer's half of the content policy (finish.py) and the queue's representation, without Aim."""

from __future__ import annotations

import gc
import pickle

from aim_llama import wire
from aim_llama.aimrun import RunConfig
from aim_llama.content import ContentPolicy
from aim_llama.finish import Finisher, format_trace
from aim_llama.records import Clipped, Flush, LogError, NodesValue, Param, TerminalOutput, TraceValue, Track
from aim_llama.render import format_nodes
from aim_llama.writer import Writer, loads_many

KEY = "sk-" + "a1B2" * 8


def test_app_side_clips_and_writer_side_redacts_and_truncates() -> None:
    policy = ContentPolicy(max_length=100)
    text = KEY + " " + "x" * 5000
    clipped = policy.text(text)
    assert isinstance(clipped, Clipped) and clipped.length == len(text)
    assert len(clipped.text) < 500  # the pipe never carries the whole text
    stored = Finisher(policy).text(clipped)
    assert KEY not in stored and stored.startswith("[REDACTED]")
    assert stored.endswith(f"… [truncated {len(text) - 100} chars]")
    assert policy.text("short " + KEY) == "short " + KEY  # unredacted until the writer
    assert Finisher(policy).text("short " + KEY) == "short [REDACTED]"
    assert ContentPolicy(capture=False).text("anything") is None


def test_errors_are_redacted_in_the_writer() -> None:
    finish = Finisher(ContentPolicy())
    rec = finish(LogError(f"llm failed: {KEY}", {"error": f"bad key {KEY}", "operation": "llm"}))
    assert isinstance(rec, LogError)
    assert KEY not in rec.message and KEY not in rec.details["error"]
    assert rec.details["operation"] == "llm"


def test_trace_rows_become_an_indented_tree_with_a_redacted_first_line() -> None:
    uuid = "-0eecb1d3-e6d4-40aa-afcf-bb0123456789"
    value = TraceValue(
        kind="query", input=f"what is {KEY}?\n  spaced", latency_ms=12.34, state="ok",
        llm_calls=1, tokens=42,
        rows=[(0, "RetrieverQueryEngine.query" + uuid, 1.0, 1.0123, "ok", ""),
              (1, "VectorIndexRetriever.retrieve" + uuid, 1.001, 1.002, "ok", " nodes=2"),
              (1, "MockLLM.predict" + uuid, 1.003, None, "error ValueError", " llm 1.0ms")],
        omitted=3)
    text = Finisher(ContentPolicy()).text(value)
    assert text.splitlines() == [
        "query: what is [REDACTED]? spaced",
        "12.3 ms · ok · llm calls 1 · tokens 42",
        "RetrieverQueryEngine.query 12.3ms ok",
        "  VectorIndexRetriever.retrieve 1.0ms ok nodes=2",
        "  MockLLM.predict open error ValueError llm 1.0ms",
        "… 3 more spans not listed",
    ]
    assert format_trace(value._replace(input=None), ContentPolicy()).startswith(
        "query: [content not captured]")


def test_nodes_render_with_rank_score_and_snippet() -> None:
    value = NodesValue("q?", [("n1", 0.91234, "alpha\n beta " + "z" * 400), ("n2", None, "")], 5)
    lines = format_nodes(value).splitlines()
    assert lines[0] == "query: q?"
    assert lines[1].startswith("1. n1 score=0.9123 | alpha beta zzz") and len(lines[1]) < 260
    assert lines[2] == "2. n2 score=- | "
    assert lines[3] == "… 3 more nodes"


def test_other_records_pass_through_unchanged() -> None:
    rec = Track("latency_ms", 1.5, "metric", {"kind": "llm"}, 3)
    assert Finisher(ContentPolicy())(rec) is rec


def test_queued_records_are_bytes_that_never_reach_the_old_generation(tmp_path) -> None:
    """A backlog must not make the garbage collector work on the application's heap."""
    writer = Writer(RunConfig(repo=str(tmp_path / "repo")), queue_size=100_000)
    writer._start = lambda: None  # type: ignore[method-assign]  # keep everything queued
    gc.collect()
    old = len(gc.get_objects(generation=2))
    for i in range(20_000):
        writer.submit_many([Track("latency_ms", float(i), "metric", {"kind": "llm"}, i),
                            Track("prompt", f"text {i}", "text", {"kind": "llm"}, i)])
    gc.collect(1)  # what the interpreter does on its own: young generations first
    assert len(gc.get_objects(generation=2)) - old < 1_000  # 40,000 records are queued
    assert writer.queued == 40_000
    chunks, records, tokens = writer._drain()
    assert records == 4_000  # MAX_BATCH chunks of two records each
    first = loads_many(b"".join(chunks[:2]))
    assert [r.value for r in first] == [0.0, "text 0", 1.0, "text 1"]
    assert writer.queued == 36_000
    writer._closed = True


def test_every_record_kind_survives_the_wire_with_its_types() -> None:
    """Chunks travel as plain tuples (wire.py); the writer must get back the same named tuples."""
    records = [
        Track("latency_ms", 1.5, "metric", {"kind": "llm"}, 3),
        Track("prompt", Clipped("head", 90_000), "text", {"kind": "llm"}, None),
        Track("trace", TraceValue("query", "q?", 1.0, "ok", 1, 9, [(0, "Q.query-x", 0.0, 1.0, "ok", "")], 0),
              "text", {}, 7),
        Track("retrieved", NodesValue("q?", [("n1", 0.5, "text")], 1), "text", {"kind": "retrieve"}),
        Track("prompt_tokens", ("a prompt",), "token_estimate", {"kind": "llm"}, 2),
        Track("raw", ("a", "plain", "tuple"), "text"),  # a tuple value must stay a tuple
        Param("aim_llama", {"pid": 1}),
        LogError("boom", {"operation": "llm"}),
        TerminalOutput("line\n"),
        Flush(4),
    ]
    back = loads_many(wire.dumps(records) + wire.dumps(records[:1]))
    assert back == [*records, records[0]]
    assert [type(r) for r in back] == [type(r) for r in [*records, records[0]]]
    assert [type(r.value) for r in back[:6]] == [float, Clipped, TraceValue, NodesValue, tuple, tuple]
    assert loads_many(pickle.dumps(("close", 1.5))) == ("close", 1.5)  # control frames pass as is
