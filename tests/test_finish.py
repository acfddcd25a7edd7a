"""The writer's half of the content policy (finish.py) and the queue's representation, without Aim."""

from __future__ import annotations

import datetime
import gc
import pickle

from llama_index.core.base.llms.types import ChatMessage

from aim_llama import wire
from aim_llama.aimrun import RunConfig
from aim_llama.content import ContentPolicy, error_message
from aim_llama.finish import Finisher, format_trace, storable
from aim_llama.records import Clipped, Flush, LogError, NodesValue, Param, TerminalOutput, TraceValue, Track
from aim_llama.render import format_nodes, render_message, render_value
from aim_llama.sysparams import _without_credentials, environment_variables, system_params
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
    # a rough count on any call (`~`) makes the request's total rough as well
    rough = value._replace(rows=[*value.rows[:2], (1, "MockLLM.predict" + uuid, 1.003, 1.004,
                                                   "ok", " llm 1.0ms tokens=~40+~2")])
    assert format_trace(rough, ContentPolicy()).splitlines()[1].endswith("· tokens ~42")


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


# -- a cut never leaves part of a secret, nor pulls text from beyond it into view -------------
PEM = "-----BEGIN PRIVATE KEY-----\n" + "M" * 400 + "\n-----END PRIVATE KEY-----"
AWS = "AKIA" + "QWERTYUIOPASDFGH"


def test_a_redacted_secret_before_the_cut_does_not_pull_text_from_beyond_it() -> None:
    policy = ContentPolicy(max_length=1000)
    text = PEM + " " + "x" * (1100 - len(PEM)) + " " + KEY + " tail" * 400
    stored = policy.finish(policy.clip(text))
    assert "sk-" not in stored and "tail" not in stored
    assert stored.startswith("[REDACTED] xxx")
    assert stored.endswith(f"xxx… [truncated {len(text) - 1000} chars]")
    # what stood before the cut is all there: the key (a 453-character PEM block) shows as
    # [REDACTED], then the x's up to position 1000 of the original text
    assert stored.count("x") == 1000 - len(PEM) - 1


def test_secrets_straddling_every_cut_are_redacted_whole() -> None:
    policy = ContentPolicy()
    finish = Finisher(policy)
    # a retrieved node whose key crosses the 200-character snippet cut
    node = NodesValue("q", [("n1", 0.5, ("a" * 189 + " " + AWS + " rest")[:456])], 1)
    assert "AKIA" not in finish.text(node) and "[REDACTED]" in finish.text(node)
    assert finish.text(node).endswith("a [REDACTED]")
    # a tool argument whose key crosses the 500-character cut
    arg = render_value("x" * 489 + " " + KEY, 500, policy.redact_head)
    assert "sk-" not in arg and arg.endswith("x [REDACTED]…")
    # an exception message whose key crosses the 2000-character cut of the Logs tab
    err = error_message(RuntimeError("e" * 1995 + " " + KEY))
    rec = finish(LogError("llm failed: RuntimeError", {"operation": "llm"}, err))
    assert isinstance(rec, LogError) and "sk-" not in rec.message
    assert rec.details["error"].endswith("e [REDACTED]… [truncated 31 chars]")
    assert rec.message == "llm failed: RuntimeError: " + rec.details["error"]
    long_err = error_message(RuntimeError("e" * 2240 + " " + KEY + "z" * 9000))
    assert isinstance(long_err, Clipped)
    rec = finish(LogError("llm failed: RuntimeError", {}, long_err))
    assert "sk-" not in rec.message
    assert rec.details["error"].endswith(f"… [truncated {2240 + 1 + len(KEY) + 9000 - 2000} chars]")


def test_the_trace_line_is_cut_in_the_original_text_and_counts_right() -> None:
    value = TraceValue("query", (PEM[:440] + " " + "y" * 100 + " " + KEY)[:556], 1.0, "ok", 0, 0,
                       [], 0)
    first = format_trace(value, ContentPolicy()).splitlines()[0]
    assert "sk-" not in first and first.startswith("query: [REDACTED]")
    short = format_trace(TraceValue("query", ("z" * 5000)[:556], 1.0, "ok", 0, 0, [], 0),
                         ContentPolicy(max_length=100)).splitlines()[0]
    assert short == "query: " + "z" * 100 + "…"


def test_user_patterns_keep_their_own_groups_and_backreferences() -> None:
    same_names = ContentPolicy(patterns=(r"password=(?P<v>\S+)", r"token=(?P<v>\S+)"))
    assert same_names.redact("password=hunter2 token=abc") == "[REDACTED] [REDACTED]"
    backref = ContentPolicy(patterns=(r"pin=(\d)\1\1\1", r"([\"'])tok_\w+\1"))
    assert backref.redact("pin=7777 and \"tok_SECRETVALUE\"") == "[REDACTED] and [REDACTED]"
    both = ContentPolicy(patterns=(*ContentPolicy().patterns, r"\d{3}-\d{2}-\d{4}"))
    assert both.redact(f"{KEY} 123-45-6789 {AWS}") == "[REDACTED] [REDACTED] [REDACTED]"
    assert ContentPolicy(patterns=(r"a*",)).redact("bcd") == "bcd"  # empty matches: nothing


def test_run_params_and_terminal_lines_are_redacted() -> None:
    finish = Finisher(ContentPolicy(patterns=(*ContentPolicy().patterns, r"\d{3}-\d{2}-\d{4}")))
    rec = finish(Param("llm_models", {"m": {"api_base": f"https://x/?k={KEY}", "n": [1, "123-45-6789"]}}))
    assert rec == Param("llm_models", {"m": {"api_base": "https://x/?k=[REDACTED]",
                                             "n": [1, "[REDACTED]"]}})
    assert _without_credentials("https://user:ghp_tok@github.com/o/r.git") == "https://github.com/o/r.git"
    assert _without_credentials("git@github.com:o/r.git") == "git@github.com:o/r.git"


def test_secret_names_and_credentials_in_values_do_not_reach_run_params() -> None:
    """A secret used as a run parameter's name, a password inside a URL in an environment
    value or an argument, and the redaction patterns themselves were stored as they were."""
    finish = Finisher(ContentPolicy())
    rec = finish(Param("run_params", {KEY: 1, "nested": {f"id {AWS}": "v"}, KEY + "x": 2}))
    assert rec == Param("run_params", {"[REDACTED]": 1, "nested": {"id [REDACTED]": "v"},
                                       "[REDACTED] 2": 2})  # (two redacted names stay two)
    env = environment_variables({"DATABASE_URL": "postgres://app:hun@ter2@db/x", "MYSQL_PWD": "p",
                                 "DB_PASS": "p", "REDIS_URL": "redis://:p@ss@h:6379",
                                 "SENTRY_DSN": "https://k@o.io/1", "AIM_LLAMA_REDACT": "hunter2",
                                 "PWD": "/srv/app", "HOME": "/root"})
    assert env == {"DATABASE_URL": "postgres://db/x", "REDIS_URL": "redis://h:6379",
                   "PWD": "/srv/app", "HOME": "/root"}
    args = system_params("python", ["app.py", "--db=mysql://root:hunter2@h/db", "a@b"],
                         {})["arguments"]
    assert args == ["app.py", "--db=mysql://h/db", "a@b"]


def test_texts_that_utf8_cannot_encode_are_finished_with_a_replacement_character() -> None:
    assert Finisher(ContentPolicy()).text("lone \udcff here") == "lone \ufffd here"
    assert storable("emoji 🙂 and \x00") == "emoji 🙂 and \x00"


def test_tool_values_that_cannot_be_shown_do_not_fail_the_record() -> None:
    class Weird:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    assert render_value(Weird()) == "<Weird object>"
    message = ChatMessage(role="assistant", content="calling", additional_kwargs={"tool_calls": [
        {"function": {"name": "book", "arguments": {"day": datetime.date(2024, 1, 1)}}}]})
    assert render_message(message) == 'assistant: calling\n  tool_call: book({"day": "2024-01-01"})'


def test_chunk_headers_count_every_record_of_every_chunk() -> None:
    """What a root writer will not unpickle (a sender that is gone) is counted from the chunk
    headers alone: every record of every chunk (a handler hands several per chunk), not one
    per chunk; a control message counts none."""
    import pickle

    from aim_llama import wire
    from aim_llama.records import Param, Track

    frame = (wire.dumps([Track("a", 1.0), Track("b", 2.0), Param("k", 1)])
             + wire.dumps([Track("c", 3.0), Track("d", 4.0)]))
    assert wire.count_records(frame) == 5
    assert wire.count_records(pickle.dumps(("close", 1.0))) == 0
