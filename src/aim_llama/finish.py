"""Records as the application made them → records as they are stored (runs in the writer).

The application's thread only gathers data; everything that costs CPU per text happens here,
in the writer (the writer process by default): redaction and truncation of captured texts and
error messages, and the formatting of `trace` and `retrieved` texts from the plain data the
observer collected. Pure functions of their input: no Aim, no LlamaIndex.
"""

from __future__ import annotations

from typing import Any

from .content import ContentPolicy
from .records import Clipped, LogError, NodesValue, Record, TraceValue, Track
from .render import format_nodes

MAX_INPUT_LINE = 300  # characters of the request input on a trace's first line


def format_trace(value: TraceValue, policy: ContentPolicy) -> str:
    """The `trace` text: the request, its totals, then one indented line per shown span."""
    if value.input is None:
        from .content import NOT_CAPTURED

        first = NOT_CAPTURED
    else:
        first = " ".join(policy.redact(value.input).split())
        if len(first) > MAX_INPUT_LINE:
            first = first[:MAX_INPUT_LINE] + "…"
    lines = [
        f"{value.kind}: {first}",
        f"{value.latency_ms:.1f} ms · {value.state} · llm calls {value.llm_calls} · "
        f"tokens {value.tokens}",
    ]
    for depth, span_id, start, end, status, note in value.rows:
        duration = "open" if end is None else f"{(end - start) * 1000.0:.1f}ms"
        lines.append(f"{'  ' * depth}{span_name(span_id)} {duration} {status}{note}")
    if value.omitted:
        lines.append(f"… {value.omitted} more spans not listed")
    return "\n".join(lines)


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
            return policy.redact(value)
        if isinstance(value, Clipped):
            return policy.finish(value)
        if isinstance(value, TraceValue):
            return format_trace(value, policy)
        if isinstance(value, NodesValue):
            return policy.finish(policy.clip(format_nodes(value)))
        return policy.finish(policy.clip(str(value)))

    def __call__(self, rec: Record) -> Record:
        """`rec` ready to store."""
        if isinstance(rec, Track):
            if rec.kind == "text":
                return rec._replace(value=self.text(rec.value))
            return rec
        if isinstance(rec, LogError):
            redact = self.policy.redact
            details = {k: redact(v) if isinstance(v, str) else v for k, v in rec.details.items()}
            return LogError(redact(rec.message), details)
        return rec
