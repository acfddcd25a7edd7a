"""Records as the application made them → records as they are stored (runs in the writer).

The application's thread only gathers data; everything that costs CPU per text happens here,
in the writer (the writer process by default): redaction and truncation of captured texts and
error messages, and the formatting of `trace` and `retrieved` texts from the plain data the
observer collected. Pure functions of their input: no Aim, no LlamaIndex.
"""

from __future__ import annotations

import re
from typing import Any

from .content import ContentPolicy
from .records import (
    ERROR_LENGTH,
    Clipped,
    LogError,
    NodesValue,
    Param,
    Record,
    RerankValue,
    TraceValue,
    Track,
)
from .render import MAX_INPUT_LINE, format_nodes, input_line

_SURROGATES = re.compile("[\ud800-\udfff]")


def format_trace(value: TraceValue, policy: ContentPolicy) -> str:
    """The `trace` text: the request, its totals, then one indented line per shown span."""
    if value.input is None:
        from .content import NOT_CAPTURED

        first = NOT_CAPTURED
    else:
        limit = MAX_INPUT_LINE
        if policy.max_length is not None:
            limit = min(limit, policy.max_length)
        first = input_line(value.input, policy.redact_head, limit)
    # a call's rough count (`~`, the writer counts exactly for the token metrics) makes the
    # request's total rough too
    approx = "~" if any("tokens=~" in row[5] for row in value.rows) else ""
    lines = [
        f"{value.kind}: {first}",
        f"{value.latency_ms:.1f} ms · {value.state} · llm calls {value.llm_calls} · "
        f"tokens {approx}{value.tokens}",
    ]
    for depth, span_id, start, end, status, note in value.rows:
        duration = "open" if end is None else f"{(end - start) * 1000.0:.1f}ms"
        lines.append(f"{'  ' * depth}{span_name(span_id)} {duration} {status}{note}")
    if value.omitted:
        lines.append(f"… {value.omitted} more spans not listed")
    return "\n".join(lines)


def storable(text: str) -> str:
    """`text` as Aim can store it: characters UTF-8 cannot encode (lone surrogates, from
    undecodable bytes) become U+FFFD instead of failing the whole record."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def storable_value(value: Any) -> Any:
    """`value` with `storable` applied to every string in it (dict keys and values, lists)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable_value(k): storable_value(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(storable_value(v) for v in value)
    return value


def span_name(span_id: str) -> str:
    """`Class.method` of a dispatcher span id (`Class.method-<uuid4>`)."""
    if len(span_id) > 37 and span_id[-37] == "-":
        return span_id[:-37]
    return span_id


class Finisher:
    """Applies the content policy's writer half to every record."""

    def __init__(self, policy: ContentPolicy) -> None:
        self.policy = policy

    def text(self, value: Any) -> str:
        """The stored form of a text record's value."""
        policy = self.policy
        if isinstance(value, str):
            text = policy.redact(value)
        elif isinstance(value, Clipped):
            text = policy.finish(value)
        elif isinstance(value, TraceValue):
            text = format_trace(value, policy)
        elif isinstance(value, NodesValue):
            text = policy.finish(policy.clip(format_nodes(value, policy.redact_head)))
        elif isinstance(value, RerankValue):
            text = policy.finish(policy.clip(
                "before:\n" + format_nodes(value.before, policy.redact_head)
                + "\nafter:\n" + format_nodes(value.after, policy.redact_head)))
        else:
            text = policy.finish(policy.clip(str(value)))
        return storable(text)

    def error(self, rec: LogError) -> LogError:
        """A Logs-tab entry with its texts redacted and the exception's message cut."""
        redact = self.policy.redact
        details = {k: storable(redact(v)) if isinstance(v, str) else v
                   for k, v in rec.details.items()}
        message = storable(redact(rec.message))
        if rec.error is not None:
            error = rec.error
            if isinstance(error, Clipped):
                text = redact(error.text, error.length, ERROR_LENGTH)
            else:
                text = redact(str(error), None, ERROR_LENGTH)
            text = storable(text)
            details["error"] = text
            message = f"{message}: {text}"
        return LogError(message, details)

    def __call__(self, rec: Record) -> Record:
        """`rec` ready to store."""
        if isinstance(rec, Track):
            context = rec.context
            if context and not all(type(v) is not str or v.isascii() for v in context.values()):
                rec = rec._replace(context=storable_value(context))  # (a tool's odd name)
            if rec.kind == "text":
                return rec._replace(value=self.text(rec.value))
            return rec
        if isinstance(rec, LogError):
            return self.error(rec)
        if isinstance(rec, Param):
            return Param(rec.key, storable_value(self.policy.redact_value(rec.value)))
        return rec
