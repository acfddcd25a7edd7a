"""The small, picklable records that flow from the handler to the writer.

They are plain named tuples of built-in values (no Aim or LlamaIndex objects) so that making
one on the application's thread costs about a microsecond; a chunk of them travels to the
writer as plain tuples in one `pickle.dumps` call (`wire.py`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

# "token_estimate": the value is a tuple of texts; the writer stores their estimated token
# count (tokenizing is too slow for the application's thread).
ValueKind = Literal["metric", "text", "distribution", "token_estimate"]


class Track(NamedTuple):
    """One value for sequence (name, context). `step=None` lets the writer number it.

    A "text" value is a `str`, a `Clipped` text, a `TraceValue`, a `NodesValue` or a
    `RerankValue`; the writer
    turns it into the stored text (formatting, redaction, truncation: `finish.py`).
    """

    name: str
    value: Any
    kind: ValueKind = "metric"
    context: dict[str, Any] | None = None
    step: int | None = None


class Clipped(NamedTuple):
    """The head of a text longer than the maximum text length, and the text's full length."""

    text: str
    length: int


class TraceValue(NamedTuple):
    """A request's `trace`, as data: the writer formats it (see `finish.format_trace`).

    `rows` are (depth, span id, start, end or None, status, note), parents before children;
    `input` is None when content capture is off.
    """

    kind: str
    input: str | None
    latency_ms: float
    state: str
    llm_calls: int
    tokens: int
    rows: list[tuple[int, str, float, float | None, str, str]]
    omitted: int


class NodesValue(NamedTuple):
    """Retrieved nodes, as data: the writer formats the `retrieved` text (`finish.format_nodes`).

    `rows` are (node id, score or None, the head of the node's text); `total` counts all nodes.
    """

    query: str | None
    rows: list[tuple[str, float | None, str]]
    total: int


class RerankValue(NamedTuple):
    """A reranker's nodes before and after, as data: the writer formats the `reranked` text."""

    before: NodesValue
    after: NodesValue


class Param(NamedTuple):
    """A run parameter: `run[key] = value` (nested dicts allowed)."""

    key: str
    value: Any


class LogError(NamedTuple):
    """An entry for the run's Logs tab (`run.log_error`).

    `error`, when given, is the exception's message (a `str`, or a `Clipped` head when it is
    long): the writer redacts it, cuts it to `ERROR_LENGTH` and adds it to the message
    (`message: error`) and to the details (`error=`).
    """

    message: str
    details: dict[str, Any]
    error: Any = None


ERROR_LENGTH = 2_000  # characters of an exception's message kept in the Logs tab


class TerminalOutput(NamedTuple):
    """Raw text the application wrote to stdout/stderr; the writer splits it into Aim `logs` lines."""

    text: str


class Flush(NamedTuple):
    """Barrier: the writer acknowledges `token` once every earlier record is stored."""

    token: int


Record = Track | Param | LogError | TerminalOutput | Flush
