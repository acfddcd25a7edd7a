"""Readable text for what LlamaIndex passes around: messages, responses, nodes, tool calls, inputs.

Everything here is defensive (unknown shapes fall back to `str()`, except streaming responses,
which are never stringified because that would consume the user's stream) and bounded: callers
cut long texts through the content policy afterwards, and lists are rendered up to a limit.
"""

from __future__ import annotations

import itertools
import json
import math
import types
from collections.abc import Callable, Iterable
from typing import Any

from .content import MARGIN
from .records import NodesValue

Head = Callable[[str, int], str]  # (text, limit) -> its first `limit` characters, redacted

MAX_ITEMS = 50  # nodes / messages rendered per text
SNIPPET = 200  # characters of each retrieved node's text
MAX_DETAIL = 200  # characters naming where an image, document … came from


def field(obj: Any, name: str) -> Any:
    """`getattr(obj, name, None)`, cheap for pydantic models that lack the attribute.

    A missing attribute of a pydantic model goes through `BaseModel.__getattr__` and an
    exception (~3 us); fields live in the instance `__dict__`, properties on the class.
    """
    fields = getattr(obj, "__dict__", None)
    if fields is not None:
        if name in fields:
            return fields[name]
        if not hasattr(type(obj), name):
            return None
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)


def is_streaming(value: Any) -> bool:
    """True for StreamingResponse, AsyncStreamingResponse, StreamingAgentChatResponse …

    (`AgentChatResponse` also has a `response_gen`, for dummy streams: the type name decides.)
    """
    return value is not None and "Streaming" in type(value).__name__


def _args_text(args: Any) -> str:
    if isinstance(args, str):
        return args
    try:
        return json.dumps(args, default=str)
    except Exception:
        return _repr(args)


def _message_tool_calls(message: Any) -> list[str]:
    """A message's tool calls: OpenAI-style `additional_kwargs["tool_calls"]`, else the
    `ToolCallBlock`s of its content blocks (providers that set both would show them twice)."""
    calls = _tool_calls(field(message, "additional_kwargs"))
    if calls:
        return calls
    blocks = field(message, "blocks")
    if not isinstance(blocks, list):
        return []
    return [f"tool_call: {field(b, 'tool_name')}({_args_text(field(b, 'tool_kwargs'))})"
            for b in blocks[:MAX_ITEMS] if field(b, "block_type") == "tool_call"]


def tool_name(tool: Any) -> str:
    """The name of a tool offered to an LLM: an OpenAI-style dict or a LlamaIndex tool."""
    if isinstance(tool, dict):
        return str((tool.get("function") or {}).get("name", "?"))
    try:
        return str(tool.metadata.name)
    except Exception:
        name = getattr(tool, "name", None)
        return name if isinstance(name, str) else type(tool).__name__


def _tool_calls(additional_kwargs: Any) -> list[str]:
    if not isinstance(additional_kwargs, dict):
        return []
    calls = additional_kwargs.get("tool_calls") or []
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else getattr(call, "function", None)
        if isinstance(fn, dict):
            name, args = fn.get("name"), fn.get("arguments")
        else:
            name, args = getattr(fn, "name", None), getattr(fn, "arguments", None)
        out.append(f"tool_call: {name}({_args_text(args)})")
    return out


# blocks a message's text leaves out that are shown anyway: tool calls have lines of their
# own, cache points say nothing
_UNSHOWN_BLOCKS = frozenset({"text", "tool_call", "cache"})


def _content(message: Any, placeholders: bool = True) -> str:
    """A message's text; an image, document, audio, video or thinking block in it is shown
    by a placeholder in its place (`message.content` holds the text blocks only) — not in
    an answer (`placeholders=False`): what the application shows is the text."""
    blocks = field(message, "blocks") if placeholders else None
    if isinstance(blocks, list) and any(
            field(b, "block_type") not in _UNSHOWN_BLOCKS for b in blocks):
        return "\n".join(filter(None, (_block_text(b) for b in blocks)))
    try:
        content = message.content
    except Exception:
        content = None
    return content if isinstance(content, str) else ""


def _block_text(block: Any, depth: int = 0) -> str:
    kind = field(block, "block_type")
    if kind == "text":
        text = field(block, "text")
        return text if isinstance(text, str) else ""
    if kind in _UNSHOWN_BLOCKS:
        return ""
    if kind == "thinking":
        thought = field(block, "content")
        return f"[thinking: {thought}]" if isinstance(thought, str) and thought else "[thinking]"
    if kind in ("citable", "citation") and depth < 2:
        # a source given to cite from, or a citation in a response: its marker, then the text
        # it holds (a citation's `cited_content` is one block, a citable source's a list)
        inner = field(block, "content" if kind == "citable" else "cited_content")
        parts = inner[:MAX_ITEMS] if isinstance(inner, list) else [inner]
        marker = _block_marker(kind, block)
        text = "\n".join(filter(None, (_block_text(b, depth + 1) for b in parts if b is not None)))
        return f"{marker}\n{text}" if text else marker
    return _block_marker(kind, block)


def _block_marker(kind: Any, block: Any) -> str:
    # where it comes from, never its bytes (a `data:` URL holds them: its type and size)
    title = field(block, "title")
    detail = next((str(v) for v in (None if title == "input_document" else title,
                                     field(block, "url"), field(block, "path"),
                                     field(block, "source"), field(block, "image_mimetype"),
                                     field(block, "document_mimetype"),
                                     field(block, "video_mimetype"), field(block, "format"))
                   if v), "")
    if detail[:5].lower() == "data:":
        head, _, data = detail.partition(",")
        size = len(data) * 3 // 4 if ";base64" in head.lower() else len(data)
        shown = f"{size // 1024} KB" if size >= 1024 else f"{size} bytes"
        detail = f"{head[5:].split(';')[0] or 'data'}, {shown} inline"
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + "…"
    return f"[{kind or type(block).__name__}{': ' + detail if detail else ''}]"


def render_message(message: Any) -> str:
    """`role: content`, with any tool calls the message carries on following lines."""
    role = getattr(getattr(message, "role", None), "value", None) or "message"
    lines = [f"{role}: {_content(message)}"]
    lines.extend("  " + c for c in _message_tool_calls(message))
    return "\n".join(lines)


def render_messages(messages: Iterable[Any]) -> str:
    """Chat messages, one block per message (the last `MAX_ITEMS`)."""
    items = list(messages)
    skipped = len(items) - MAX_ITEMS
    lines = [f"… {skipped} earlier messages"] if skipped > 0 else []
    lines.extend(render_message(m) for m in items[-MAX_ITEMS:])
    return "\n".join(lines)


def render_response(response: Any) -> str:
    """The text of a Completion/ChatResponse (tool calls shown); never consumes a stream."""
    if response is None:
        return ""
    message = field(response, "message")
    if message is not None:
        parts = [_content(message), *_message_tool_calls(message)]
        return "\n".join(p for p in parts if p)
    text = field(response, "text")
    return text if isinstance(text, str) else ""


def answer_text(result: Any) -> str | None:
    """The final answer of a query / chat / agent / workflow result, or None (streams: None)."""
    if result is None or is_streaming(result):
        return None
    inner = getattr(result, "response", None)
    if isinstance(inner, str):
        return plain(inner)
    if inner is not None and hasattr(inner, "content") and hasattr(inner, "role"):
        # AgentOutput.response: a ChatMessage; its text, or what it holds instead
        return _content(inner, placeholders=False) or _content(inner)
    if _is_stop_event(result):
        inner = stop_result(result)
        if inner is not result:
            return answer_text(inner)
    if isinstance(result, str):
        return plain(result)
    if type(result).__module__ == "builtins":
        return bounded_repr(result) if type(result) in (list, tuple, dict) else str(result)
    # a structured answer: the query engine's `output_cls` object, or the result itself
    found = _model_json(inner) if inner is not None else None
    return found if found is not None else _model_json(result)


def _is_stop_event(value: Any) -> bool:
    return any(c.__name__ == "StopEvent" for c in type(value).__mro__)


def stop_result(result: Any) -> Any:
    """What a workflow's `StopEvent` carries: its `result`, else a stream held in one of a
    subclass's fields (`class RagOutput(StopEvent): response: ...`); else `result` itself."""
    if not _is_stop_event(result):
        return result
    try:
        inner = result.result
    except Exception:
        inner = None
    if inner is not None:
        return inner
    for value in getattr(result, "__dict__", {}).values():
        if is_streaming(value):
            return value
    return result


def _holds_stream(value: Any, depth: int = 3) -> bool:
    """Whether a model holds a stream or a generator (in its fields, their fields, dicts and
    lists, `depth` levels down): dumping it as JSON would read the stream."""
    if is_streaming(value) or isinstance(value, _GENERATORS):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        items: Iterable[Any] = itertools.islice(value.values(), MAX_ITEMS)
    elif isinstance(value, (list, tuple)):
        items = value[:MAX_ITEMS]
    else:
        fields = getattr(value, "__dict__", None)
        if not isinstance(fields, dict) or type(value).__module__ == "builtins":
            return False
        items = itertools.islice(fields.values(), MAX_ITEMS)
    return any(_holds_stream(v, depth - 1) for v in items)


def _model_json(value: Any) -> str | None:
    """A pydantic model's JSON (a structured answer), None for anything else."""
    dump = getattr(value, "model_dump_json", None)
    if dump is None or isinstance(value, type) or _holds_stream(value):
        return None
    try:
        text = dump()
    except Exception:
        return None
    return text if isinstance(text, str) else None


def query_text(value: Any) -> str:
    """A query given as a string or a QueryBundle."""
    if isinstance(value, str):
        return plain(value)
    q = getattr(value, "query_str", None)
    return plain(q) if isinstance(q, str) else ("" if value is None else plain(str(value)))


def plain(text: str) -> str:
    """`text` as an exact `str`: a subclass of the application's own could not be unpickled by
    the writer process, which does not have its class."""
    return text if type(text) is str else str.__str__(text)


_INPUT_KEYS = ("str_or_query_bundle", "query_str", "query", "question", "message", "user_msg",
               "prompt", "messages", "input", "start_event")


def input_text(arguments: dict[str, Any]) -> str:
    """The request input from a span's bound arguments (the question, user message, prompt …)."""
    args = dict(arguments)
    args.pop("self", None)
    extra = args.pop("kwargs", None)
    if isinstance(extra, dict):
        args.update(extra)
    for key in _INPUT_KEYS:
        value = args.get(key)
        if value is None:
            continue
        if key == "start_event":  # a workflow StartEvent: its fields live in a dict-like model
            fields = _event_fields(value)
            found = input_text(fields) if fields else ""
            if found:
                return found
            if fields:  # no text among them: the run's inputs as `name=value`
                return ", ".join(f"{k}={_brief(v)}" for k, v in fields.items())
            continue
        if key == "messages" and isinstance(value, list):
            users = [m for m in value if getattr(getattr(m, "role", None), "value", "") == "user"]
            return _content(users[-1]) if users else render_messages(value[-1:])
        if hasattr(value, "role") and hasattr(value, "content"):
            return _content(value)
        return query_text(value)
    texts = [value for value in args.values() if isinstance(value, str)]
    return max(texts, key=len) if texts else ""  # (the longest: an id is rarely the input)


def _brief(value: Any) -> str:
    """A short, cheap rendering of a workflow input that is not text: scalars as they are,
    anything else by type and size (never a repr of a whole document list)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def _event_fields(event: Any) -> dict[str, Any]:
    """A workflow StartEvent's inputs: the fields a typed subclass declares, then the ones
    given to a plain StartEvent (they live in its dict-like store)."""
    fields: dict[str, Any] = {}
    try:
        for name in type(event).model_fields:
            fields[name] = getattr(event, name)
    except Exception:
        pass
    try:
        fields.update(dict(event.items()))
    except Exception:
        pass
    return fields


_MAX_ITEMS_SHOWN = 100  # items of a big list / tuple / dict rendered (the rest is counted)


def _repr(value: Any, clip: int | None = None) -> str:
    try:
        return bounded_repr(value, clip)
    except Exception:
        return f"<{type(value).__name__} object>"


def bounded_repr(value: Any, clip: int | None = None) -> str:
    """repr(value), but big builtin containers — at the top or nested a few levels down — show
    their first items and their size only: the whole repr of 200 000 dicts (~0.3 s) was made on
    the application's thread to keep a head. With `clip`, builtin `str` / `bytes` longer than
    that show their first `clip` characters (a 20 MB `bytes` argument: ~70 ms of repr for a
    500-character head). Other classes keep their own repr (it may hide a secret)."""
    kind = type(value)
    if kind in _TEXTS:
        return _text_repr(value, clip)
    if kind not in _CONTAINERS or not _has_big(value, 3, clip):
        return repr(value)
    return _head_repr(value, clip, set())


_CONTAINERS = (list, tuple, dict, set, frozenset)
_TEXTS = (str, bytes, bytearray)


def _text_repr(value: str | bytes | bytearray, clip: int | None) -> str:
    if clip is None or len(value) <= clip:
        return repr(value)
    unit = "characters" if type(value) is str else "bytes"
    return f"{value[:clip]!r}… ({len(value)} {unit})"


def _has_big(value: Any, levels: int, clip: int | None = None) -> bool:
    kind = type(value)
    if kind in _TEXTS:
        return clip is not None and len(value) > clip
    if kind not in _CONTAINERS:
        return False
    if len(value) > _MAX_ITEMS_SHOWN:
        return True
    return levels > 0 and any(_has_big(v, levels - 1, clip) for v in (
        itertools.chain(value, value.values()) if kind is dict else value))


def _head_repr(value: Any, clip: int | None, path: set[int]) -> str:
    kind = type(value)
    if kind in _TEXTS:
        return _text_repr(value, clip)
    if kind not in _CONTAINERS or not value:
        return repr(value)
    if id(value) in path:  # a container holding itself: as repr shows it
        return "[...]" if kind is list else "{...}" if kind is dict else "(...)"
    path.add(id(value))
    shown = itertools.islice(value.items() if kind is dict else value, _MAX_ITEMS_SHOWN)
    if kind is dict:
        parts = [f"{_head_repr(k, clip, path)}: {_head_repr(v, clip, path)}" for k, v in shown]
    else:
        parts = [_head_repr(v, clip, path) for v in shown]
    path.discard(id(value))
    if len(value) > _MAX_ITEMS_SHOWN:
        parts.append(f"… {len(value)} items")
    elif kind is tuple and len(value) == 1:
        parts[0] += ","
    brackets = "[]" if kind is list else "()" if kind is tuple else "{}"
    shown_text = brackets[0] + ", ".join(parts) + brackets[1]
    return f"frozenset({shown_text})" if kind is frozenset else shown_text


def render_value(value: Any, limit: int = 2_000, head: Head | None = None) -> str:
    """A short repr-like rendering of a tool argument or output, cut at `limit` characters.

    `head` cuts a longer one (the content policy's `redact_head`): secrets are redacted before
    the cut, so none is left half visible at it.
    """
    text = value if isinstance(value, str) else _repr(value, limit + MARGIN)
    if len(text) <= limit:
        return text
    return (head(text[: limit + MARGIN], limit) if head is not None else text[:limit]) + "…"


def render_tool_call(name: str, arguments: dict[str, Any], output: str,
                     head: Head | None = None) -> str:
    """`name(arg=value, …) -> output` from a tool span's bound arguments."""
    args = dict(arguments)
    args.pop("self", None)
    parts = [render_value(a, 500, head) for a in args.pop("args", ()) or ()]
    kwargs = args.pop("kwargs", None)
    if isinstance(kwargs, dict):
        args.update(kwargs)
    parts.extend(f"{k}={render_value(v, 500, head)}" for k, v in args.items()
                 if not _is_workflow_context(v))
    return f"{name}({', '.join(parts)})\n-> {output}"


def _is_workflow_context(value: Any) -> bool:
    """The workflow `Context` LlamaIndex passes to tools that ask for it: not an argument the
    model gave (and its repr holds a memory address)."""
    cls = type(value)
    return cls.__name__ == "Context" and "workflow" in (cls.__module__ or "")


def render_nodes(nodes: list[Any], query: str | None = None) -> str:
    """`query: …` then one line per node: rank, id, score and a snippet of its text."""
    return format_nodes(NodesValue(query, node_rows(nodes), len(nodes)))


MAX_INPUT_LINE = 300  # characters of a request's input on a trace's first line, or a query's


def input_line(text: str, head: Head | None = None, limit: int = MAX_INPUT_LINE) -> str:
    """A request's input (or a query) on one line: whitespace collapsed, cut at `limit` (by
    `head`, which redacts before it cuts) with "…" when it was longer."""
    cut = head(text, limit) if head is not None else text[:limit]
    return " ".join(cut.split()) + ("…" if len(text) > limit else "")


def format_nodes(value: NodesValue, head: Head | None = None) -> str:
    """The text of `render_nodes` from rows gathered by `node_rows` (the writer calls this,
    with the content policy's `redact_head`, so a snippet never ends in half a secret)."""
    lines = [] if value.query is None else [f"query: {input_line(value.query, head)}"]
    for i, (node_id, score, text) in enumerate(value.rows, 1):
        cut = head(text, SNIPPET) if head is not None else text[:SNIPPET]
        snippet = " ".join(cut.split())
        score_txt = f"{score:.4f}" if isinstance(score, (int, float)) else "-"
        lines.append(f"{i}. {node_id} score={score_txt} | {snippet}")
    if value.total > len(value.rows):
        lines.append(f"… {value.total - len(value.rows)} more nodes")
    return "\n".join(lines)


def node_rows(nodes: list[Any]) -> list[tuple[str, float | None, str]]:
    """(id, score, head of the text) of the first `MAX_ITEMS` nodes: the data of `render_nodes`,
    gathered cheaply on the application's thread (the writer redacts and formats it; the head
    reaches `MARGIN` characters beyond the snippet, so a secret crossing it is still seen)."""
    rows: list[tuple[str, float | None, str]] = []
    for n in nodes[:MAX_ITEMS]:
        inner = field(n, "node") or n
        node_id = field(inner, "id_") or field(inner, "node_id") or "?"
        score = field(n, "score")
        text = field(inner, "text")
        if not isinstance(text, str):
            try:
                text = inner.get_content()
            except Exception:
                text = ""
        rows.append((str(node_id), score if isinstance(score, (int, float)) else None,
                     str(text)[: SNIPPET + MARGIN]))
    return rows


def scores_of(nodes: list[Any]) -> list[float]:
    """The numeric scores of NodeWithScore items."""
    return [float(s) for s in (getattr(n, "score", None) for n in nodes)
            if isinstance(s, (int, float)) and math.isfinite(s)]  # (a zero vector's NaN)
