"""The callback mapping without Aim: records out, failures contained and counted."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from llama_index.core.callbacks.schema import CBEventType, EventPayload

from aim_llama.handler import AimLlamaHandler, records_for_end
from aim_llama.log import reset_reported
from aim_llama.records import LogError, Track


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot render this chunk")


def test_chunk_texts_have_bounded_contexts() -> None:
    sink: list[object] = []
    handler = AimLlamaHandler(sink.append)
    handler.on_event_start(CBEventType.CHUNKING, {}, event_id="e1")
    handler.on_event_end(CBEventType.CHUNKING, {EventPayload.CHUNKS: ["alpha", "beta"]}, event_id="e1")
    chunks = [r for r in sink if isinstance(r, Track) and r.name == "chunk"]
    assert [r.value for r in chunks] == ["alpha", "beta"]
    assert all(r.context == {"kind": "chunking"} and r.step is None for r in chunks)


def test_a_failure_inside_the_handler_is_contained_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reset_reported()
    sink: list[object] = []
    handler = AimLlamaHandler(sink.append)
    caplog.set_level(logging.WARNING, logger="aim_llama")
    for n in range(3):  # the application sees no exception, three times
        handler.on_event_start(CBEventType.CHUNKING, {}, event_id=f"e{n}")
        handler.on_event_end(CBEventType.CHUNKING, {EventPayload.CHUNKS: [Unprintable()]},
                             event_id=f"e{n}")
    assert handler.handler_errors == 3
    logged = [r for r in caplog.records if "could not record a LlamaIndex chunking event" in r.message]
    assert len(logged) == 1  # once per kind, not per event
    counts = [r.value for r in sink if isinstance(r, Track) and r.name == "handler_errors"]
    assert counts == [1, 2, 3]


def test_an_exception_in_a_payload_becomes_an_error_record_not_a_chunk() -> None:
    records = records_for_end(
        CBEventType.CHUNKING, {EventPayload.EXCEPTION: RuntimeError("splitter broke")}, 5.0,
    )
    names = [getattr(r, "name", type(r).__name__) for r in records]
    assert names == ["errors", "LogError"]  # and no latency: chunking has none
    (error,) = [r for r in records if isinstance(r, LogError)]
    assert error.details["operation"] == "chunking" and "splitter broke" in str(error.error)


def test_only_event_types_the_dispatcher_does_not_record_reach_the_handler() -> None:
    """LLM calls, retrievals … are the dispatcher's: LlamaIndex never calls the handler for
    them (its ignore lists), so nothing is recorded twice."""
    handler = AimLlamaHandler(lambda r: None)
    for kind in ("llm", "embedding", "retrieve", "query", "exception"):
        assert CBEventType(kind) in handler.event_starts_to_ignore
        assert CBEventType(kind) in handler.event_ends_to_ignore
    assert CBEventType.CHUNKING not in handler.event_ends_to_ignore


def test_big_containers_are_rendered_by_their_head_and_size() -> None:
    """A tool argument or workflow result of 200 000 items is not repr'd whole on the app's
    thread (0.3 s each) to keep a few hundred characters: its first 100 items and its size."""
    from aim_llama.render import answer_text, bounded_repr

    assert bounded_repr(list(range(1000))) == repr(list(range(100)))[:-1] + ", … 1000 items]"
    assert bounded_repr(tuple(range(101))).endswith("99, … 101 items)")
    big = {f"k{i}": i for i in range(500)}
    assert bounded_repr(big) == repr(dict(list(big.items())[:100]))[:-1] + ", … 500 items}"
    assert bounded_repr([1, 2]) == "[1, 2]" and answer_text({"a": 1}) == "{'a': 1}"
    assert answer_text(list(range(200_000))).endswith(", … 200000 items]")
    nested = {"rows": [{"id": i} for i in range(1000)], "empty": set(), "one": (1,)}
    assert bounded_repr(nested) == ("{'rows': " + repr([{"id": i} for i in range(100)])[:-1]
                                    + ", … 1000 items], 'empty': set(), 'one': (1,)}")


def test_megabyte_texts_in_tool_values_are_cut_before_their_repr() -> None:
    """A 20 MB `bytes` / `str` tool argument was repr'd whole on the app's thread (~70 ms) to
    keep 500 characters: builtin texts are cut first, with the same head; other classes keep
    their own repr (a `SecretStr` stays masked), and a container holding itself does not hang."""
    import tracemalloc

    from pydantic import SecretStr

    from aim_llama.content import ContentPolicy
    from aim_llama.render import bounded_repr, render_value

    data = bytes(range(256)) * 80_000  # 20 MB
    tracemalloc.start()
    try:
        shown = render_value({"payload": data, "n": 1}, 500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak  # the whole repr would be ~70 MB
    big = "k" * 5_000_000
    for value in ({big: 1}, frozenset([big]), [[[big]]], {"a": ({big},)}):
        tracemalloc.start()
        try:
            cut = render_value(value, 500)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 100_000 and cut == repr(value)[:500] + "…", (type(value), peak)
    assert shown == repr({"payload": data[:1000], "n": 1})[:500] + "…"
    assert render_value(data, 500) == repr(data[:600])[:500] + "…"
    assert bounded_repr(data) == repr(data)  # no cut asked for: as before
    text = "é" * 3_000_000
    assert render_value({"q": 1, "doc": text}, 500) == repr({"q": 1, "doc": text[:1000]})[:500] + "…"
    secret = SecretStr("hunter2-very-secret")
    shown = render_value([secret, "y" * 5_000_000], 500)
    assert "hunter2" not in shown and shown.startswith("[SecretStr('**********'), 'yyy")
    # a key straddling the cut inside a cut text is still redacted whole
    key = "sk-" + "a1B2" * 12
    policy = ContentPolicy()
    arg = render_value({"k": "x" * 480 + " " + key + "z" * 2_000_000}, 500, policy.redact_head)
    assert "sk-" not in arg and "[REDACTED]" in arg
    loop: list[object] = ["w" * 10_000]
    loop.append(loop)
    assert render_value(loop, 2_000, None) == repr(["w" * 1_999])[:2_000] + "…"
    loop.append("tail")
    assert bounded_repr(loop, 10) == "['wwwwwwwwww'… (10000 characters), [...], 'tail']"


def test_document_and_video_blocks_show_their_type() -> None:
    """`[document]` / `[video]` said nothing of what was sent: their MIME type now."""
    from llama_index.core.base.llms.types import ChatMessage, DocumentBlock, TextBlock, VideoBlock

    from aim_llama.render import render_message

    message = ChatMessage(role="user", blocks=[
        TextBlock(text="see"), DocumentBlock(data=b"%PDF-1.4 x", document_mimetype="application/pdf"),
        VideoBlock(video=b"\x00\x00\x00 ftypmp42", video_mimetype="video/mp4")])
    assert render_message(message) == "user: see\n[document: application/pdf]\n[video: video/mp4]"


def test_llm_models_lists_the_first_100_models() -> None:
    """README: `llm_models` lists the first 100 models (not 99), and stops there."""
    from aim_llama.observer import Observer, _Call
    from aim_llama.records import Param

    sink: list[Any] = []
    observer = Observer(sink.extend)
    for i in range(102):
        call = _Call(0.0, None, False)
        call.model = {"model": f"model-{i}"}
        observer._model_param(call, None)
    params = [r for r in sink if isinstance(r, Param) and r.key == "llm_models"]
    assert len(params) == 100
    assert list(params[-1].value) == [f"model-{i}" for i in range(100)]


def test_the_callback_handler_keeps_a_bounded_number_of_open_events() -> None:
    """Start times of events whose end never comes (an aborted stream) are bounded
    (`MAX_OPEN_EVENTS`), the oldest dropped first; a recent event still gets its latency."""
    from llama_index.core.callbacks.schema import CBEventType

    from aim_llama.handler import MAX_OPEN_EVENTS, AimLlamaHandler
    from aim_llama.records import Track

    sink: list[Any] = []
    handler = AimLlamaHandler(sink.append)
    for n in range(MAX_OPEN_EVENTS + 5):
        handler.on_event_start(CBEventType.NODE_PARSING, {}, event_id=f"e{n}")
    assert len(handler._open) <= MAX_OPEN_EVENTS
    assert "e0" not in handler._open
    handler.on_event_end(CBEventType.NODE_PARSING, {}, event_id=f"e{MAX_OPEN_EVENTS + 4}")
    assert [r.name for r in sink if isinstance(r, Track)] == ["latency_ms"]
