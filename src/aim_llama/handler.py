"""LlamaIndex callback events → aim-llama records (a pure mapping; nothing here touches Aim).

`AimLlamaHandler` sits on `Settings.callback_manager`. For each event end it builds a few
`Track` records and hands them to `submit` (the writer's hot path). Contexts hold only bounded
values (`{"kind": "llm"}` …) so that a thousand LLM calls make a handful of Aim sequences;
steps, not contexts, tell calls apart: the Nth LLM call's prompt, response and latency all
carry step N.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType, EventPayload

from . import importhook
from .content import ContentPolicy, error_message, pausing
from .log import warn_once
from .records import LogError, Record, Track

log = logging.getLogger("aim_llama")

MAX_OPEN_EVENTS = 10_000  # start times kept for events whose end never came (e.g. aborted streams)

# What the root instrumentation dispatcher records when it is registered too (`dispatcher.py`):
# these event types are skipped here so every LLM call, retrieval … is recorded exactly once.
# Sub-millisecond internal steps, repeated inside every query: their timing is in the `trace`
# text; a metric each would double the writer's work for little insight.
NO_LATENCY = frozenset({CBEventType.CHUNKING.value, CBEventType.TEMPLATING.value})

# Event types whose start time is never used (no latency metric) and those whose end never
# yields a record (templating: no latency, no payload worth a text; its failures reach the
# request's span and the exception event).
NO_START = (CBEventType.CHUNKING, CBEventType.TEMPLATING)
NO_END = (CBEventType.TEMPLATING,)

DISPATCHER_OWNED = frozenset({
    "llm", "embedding", "retrieve", "query", "reranking", "function_call", "agent_step",
    "exception", "sub_question",
})

Submit = Callable[[Record], None]
SubmitMany = Callable[[list[Record]], None]


def _union(*groups: Iterable[CBEventType]) -> list[CBEventType]:
    """The event types of all groups, each once, in first-seen order."""
    return list(dict.fromkeys(e for group in groups for e in group))


def _ctx(kind: str) -> dict[str, Any]:
    return {"kind": kind}


def error_records(kind: str, exc: BaseException, step: int | None = None) -> list[Record]:
    """An `errors` count for the kind plus a Logs-tab entry naming operation, type and message."""
    return [
        Track("errors", 1, "metric", _ctx(kind), step),
        LogError(  # the writer adds the redacted, cut message (`error`)
            f"{kind} failed: {type(exc).__name__}",
            {"operation": kind, "exception_type": type(exc).__name__},
            error_message(exc),
        ),
    ]


_CHUNKING = CBEventType.CHUNKING.value


def records_for_end(
    event_type: str, payload: dict[str, Any] | None, latency_ms: float | None,
    errors: bool = True,
) -> list[Record]:
    """Map one finished callback event to records. Pure: no I/O, no Aim.

    Only the event types the dispatcher does not record reach here (`DISPATCHER_OWNED`):
    chunking texts, other steps' latency, and an exception a payload carries (unless
    `errors` is False: recorded by the dispatcher, or `exception` is ignored)."""
    payload = payload or {}
    kind = str(getattr(event_type, "value", event_type))
    exc = payload.get(EventPayload.EXCEPTION)
    out: list[Record] = []
    if isinstance(exc, BaseException):
        if errors and not pausing(exc):
            out.extend(error_records(kind, exc))
    elif kind == _CHUNKING:
        for chunk in payload.get(EventPayload.CHUNKS) or []:
            out.append(Track("chunk", str(chunk), "text", _ctx(kind)))
    if latency_ms is not None and kind not in NO_LATENCY:
        out.append(Track("latency_ms", latency_ms, "metric", _ctx(kind)))
    return out


class AimLlamaHandler(BaseCallbackHandler):
    """A LlamaIndex callback handler that turns events into records for the Aim writer.

    It never raises into the application: a failure inside it is logged once per kind and
    counted (`handler_errors`), and the event is skipped. The event types the dispatcher
    records (`DISPATCHER_OWNED`) join LlamaIndex's ignore lists, which the CallbackManager
    checks before calling; `policy` redacts, truncates or drops every text.
    """

    def __init__(
        self,
        submit: Submit,
        event_starts_to_ignore: list[str] | None = None,
        event_ends_to_ignore: list[str] | None = None,
        *,
        policy: ContentPolicy | None = None,
        submit_many: SubmitMany | None = None,
    ) -> None:
        skipped = [e for e in CBEventType if e.value in DISPATCHER_OWNED]
        # LlamaIndex checks these lists before calling us: event types another channel records,
        # and those that never yield a record here, cost no Python call at all (~12 per query).
        # A type named in either of the user's lists is not recorded at all (as on the
        # dispatcher channel): most of its records are made at its end.
        named = [CBEventType(e) for e in [*(event_starts_to_ignore or []),
                                          *(event_ends_to_ignore or [])]]
        super().__init__(
            event_starts_to_ignore=_union(named, skipped, NO_START),
            event_ends_to_ignore=_union(named, skipped, NO_END),
        )
        self.submit = submit
        self.submit_many: SubmitMany = submit_many or self._one_by_one
        self.handler_errors = 0
        self._open: dict[str, float] = {}
        self._lock = threading.Lock()
        self.policy = policy or ContentPolicy()
        self.observer: Any = None  # the dispatcher observer registered alongside, if any
        # Set by `uninstrument()`: managers it could not take this handler off (a component's
        # deep copy, an engine unpickled in this process) pass their events on to whatever
        # activation is current, or drop them, rather than write to a closed writer.
        self.retired = False
        # `exception` named in an ignore list: no error is recorded, whichever channel sees it
        self.errors_off = CBEventType.EXCEPTION in named

    # A component built after activation holds this handler (through its callback manager);
    # copying or pickling the component must work as it does without aim-llama.
    def __deepcopy__(self, memo: dict[int, Any]) -> AimLlamaHandler:
        """A deep-copied component records into the same run: the copy shares this handler."""
        return self

    def __copy__(self) -> AimLlamaHandler:
        return self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        """Pickled as a reference: unpickled, it is the handler of the process that unpickles
        it (a pool worker, a Ray task), or one that does nothing where aim-llama is not on."""
        return (restore, ())

    def _one_by_one(self, records: list[Record]) -> None:
        submit = self.submit
        for record in records:
            submit(record)

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        """Remember when the event started (for its latency)."""
        if self.retired:
            return _forward_start(event_type, payload, event_id, parent_id, kwargs)
        try:
            opened = self._open
            if len(opened) >= MAX_OPEN_EVENTS:
                with self._lock:
                    for key in list(itertools.islice(opened, MAX_OPEN_EVENTS // 10)):
                        opened.pop(key, None)
            opened[event_id] = time.perf_counter()
        except Exception as exc:
            self._failed("start", event_type, exc)
        return event_id

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        """Map the finished event to records and queue them; never raises."""
        if self.retired:
            _forward_end(event_type, payload, event_id, kwargs)
            return
        try:
            if event_type is CBEventType.CHUNKING and self.observer is not None \
                    and self.observer.repeats_chunks():
                # A response synthesizer re-splitting text (inside a request, or an index
                # build's summaries): that text is in the prompt already (and chunking has no
                # latency metric).
                self._open.pop(event_id, None)
                return
            started = self._open.pop(event_id, None)
            latency = None if started is None else (time.perf_counter() - started) * 1000.0
            policy = self.policy
            observer = self.observer
            sampled = observer is None or policy.sample_rate >= 1.0 or observer.current_sampled()
            errors = not self.errors_off
            if errors and payload and observer is not None:
                exc = payload.get(EventPayload.EXCEPTION)
                if isinstance(exc, BaseException) and not pausing(exc):
                    # a step's failure reaches both channels (this event's payload, then the
                    # failing spans): one exception, recorded once, by whichever sees it first
                    errors = observer.claim_error(exc)
            out: list[Record] = []
            for record in records_for_end(event_type, payload, latency, errors):
                if isinstance(record, Track) and record.kind == "text":
                    text = policy.text(record.value) if sampled else None
                    if text is None:
                        continue
                    record = record._replace(value=text)
                out.append(record)  # texts and errors are redacted in the writer
            if out:
                self.submit_many(out)
        except Exception as exc:
            self._failed("end", event_type, exc)

    def _failed(self, phase: str, event_type: Any, exc: Exception) -> None:
        self.handler_errors += 1
        kind = str(getattr(event_type, "value", event_type))
        warn_once(
            f"handler:{phase}:{kind}:{type(exc).__name__}",
            "could not record a LlamaIndex %s event (%s): %s: %s; the application continues",
            kind,
            phase,
            type(exc).__name__,
            exc,
        )
        with contextlib.suppress(Exception):
            self.submit(Track("handler_errors", self.handler_errors, "metric", {"kind": kind}))

    def start_trace(self, trace_id: str | None = None) -> None:
        """Traces are labels shared by concurrent requests in LlamaIndex; nothing to do."""

    def end_trace(
        self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None
    ) -> None:
        """See `start_trace`."""


class _Inert(BaseCallbackHandler):
    """An aim-llama handler unpickled where aim-llama was not active: it does nothing, or
    passes the event on to the handler of an activation that came later."""

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                       event_id: str = "", parent_id: str = "", **kwargs: Any) -> str:
        return _forward_start(event_type, payload, event_id, parent_id, kwargs)

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                     event_id: str = "", **kwargs: Any) -> None:
        _forward_end(event_type, payload, event_id, kwargs)

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None,
                  trace_map: dict[str, list[str]] | None = None) -> None:
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (restore, ())


# aim-llama's callback handler classes: live or retired, and inert
AIM_LLAMA_HANDLERS: tuple[type[BaseCallbackHandler], ...] = (AimLlamaHandler, _Inert)


def restore() -> BaseCallbackHandler:
    """What a pickled aim-llama handler becomes: this process's active handler, else an inert one."""
    handler = _active_handler()
    return handler if handler is not None else _Inert()


def _active_handler() -> AimLlamaHandler | None:
    from .autoinstrument import active_handler  # (autoinstrument imports this module)

    handler = active_handler()
    return handler if isinstance(handler, AimLlamaHandler) else None


def _forward_start(event_type: CBEventType, payload: dict[str, Any] | None, event_id: str,
                   parent_id: str, kwargs: dict[str, Any]) -> str:
    """A retired or inert handler's event start, passed to the active handler if there is one
    (a component copied or unpickled before the current activation)."""
    target = _active_handler()
    if target is None or event_type in target.event_starts_to_ignore:
        return event_id
    return target.on_event_start(event_type, payload, event_id, parent_id, **kwargs)


def _forward_end(event_type: CBEventType, payload: dict[str, Any] | None, event_id: str,
                 kwargs: dict[str, Any]) -> None:
    target = _active_handler()
    if target is not None and event_type not in target.event_ends_to_ignore:
        target.on_event_end(event_type, payload, event_id, **kwargs)


# Imported by the application before LlamaIndex: activation waited for this module (auto.py).
importhook.module_done(__name__)
