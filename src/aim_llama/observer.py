"""What the LlamaIndex instrumentation dispatcher reports → aim-llama records.

The root dispatcher (`llama_index.core.instrumentation.get_dispatcher()`) sees every span
(decorated method call, with its parent id carried by context variables) and every
instrumentation event, whenever the component was built. `Observer` owns these data:

* LLM calls (chat and completion, streaming or not) — exactly once per user-level call: an
  LLM call made inside another in-flight LLM call (MockLLM's `acomplete` → `complete`,
  `chat` → `complete`) belongs to the outer one.
* embeddings, retrieval, reranking, tools, agent / workflow steps, errors;
* per root request (query, chat, agent or workflow run, retrieval): question,
  answer, end-to-end latency and one `trace` Text built from span parent ids.

State is bounded: span bookkeeping is freed when a span ends, a request's tree is freed when
its trace is written, and requests idle longer than `ROOT_TTL` seconds expire.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import enum
import functools
import inspect
import itertools
import logging
import re
import sys
import threading
import time
import types
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from . import render
from .content import MARGIN, ContentPolicy, error_message, pausing
from .finish import span_name
from .log import warn_once
from .records import LogError, NodesValue, Param, Record, RerankValue, TraceValue, Track
from .render import MAX_INPUT_LINE
from .tokens import TokenCounts, can_defer, estimate, estimated_counts, provider_counts, rough

log = logging.getLogger("aim_llama")

ROOT_TTL = 1800.0  # seconds without any activity after which a request's state expires
SWEEP_INTERVAL = 5.0
MAX_OPEN_ROOTS = 10_000
MAX_TRACE_NODES = 400  # lines per trace; further spans are counted, not listed
# Root spans of these kinds are requests with a `trace` (a bare LLM call at the root is not:
# its prompt / response / metrics say everything, and a trace per call would be noise).
REQUEST_KINDS = frozenset({"query", "chat", "agent", "workflow", "retrieve"})
ANSWER_KINDS = frozenset({"query", "chat", "agent", "workflow"})
TOOL_NOT_FOUND = "<not found>"  # the `tool` context of a tool the model named that does not exist
AT_SHUTDOWN = "incomplete at shutdown"  # a request's status when the process ends under it
EXPIRED = "expired (incomplete)"  # a request's status when it was idle for ROOT_TTL
# spans with records at exit
_SPECIAL_EXIT = frozenset({"tool", "agent_step", "workflow_step", "postprocess"})
_STEP_KINDS = frozenset({"agent_step", "workflow_step"})
_RUNS = frozenset({"agent", "workflow"})
# methods of request components that LlamaIndex spans but that ask nothing of them: a chat
# engine's reset, and the prompt accessors behind `get_prompts()` / `update_prompts()`
_NOT_REQUESTS = frozenset({
    "reset", "areset", "_get_prompts", "_get_prompt_modules", "_update_prompts",
})
ERROR_KINDS = frozenset({
    "llm", "embedding", "retrieve", "query", "chat", "agent", "workflow", "tool",
    "postprocess", "synthesize", "agent_step", "workflow_step",
})
# Our record families → the LlamaIndex CBEventType names whose ignore lists suppress them.
IGNORE_NAMES = {
    "llm": "llm", "embedding": "embedding", "retrieve": "retrieve", "rerank": "reranking",
    "tool": "function_call", "agent_step": "agent_step", "workflow_step": "agent_step",
    "query": "query", "chat": "query", "agent": "query", "workflow": "query",
    "errors": "exception",
}

SubmitMany = Callable[[list[Record]], None]

_awaiting: contextvars.ContextVar[_Root | None] = contextvars.ContextVar(
    "aim_llama_awaiting_stream", default=None
)


_now = time.perf_counter


class _Node:
    """One span. Shown spans form the trace tree; hidden ones (private methods, the same
    object's nested calls, internals) only point at the shown ancestor they belong to."""

    __slots__ = (
        "children",
        "disp",
        "end",
        "id",
        "inst",
        "inst_id",
        "kind",
        "nested",
        "note",
        "parent",
        "ran_tool",
        "root",
        "start",
        "status",
    )

    def __init__(self, id_: str, kind: str, parent: _Node | None, start: float, instance: Any
                 ) -> None:
        self.id = id_
        self.kind = kind
        self.parent = parent
        self.root: _Root
        self.disp: _Node | None = None  # the shown node this one belongs to (None: itself)
        self.start = start
        self.end: float | None = None
        self.status = "ok"
        self.note = ""
        self.children: list[_Node] | None = None
        self.inst = instance
        self.inst_id = 0 if instance is None else id(instance)
        self.nested = False
        self.ran_tool = False  # (a step: a tool span ran under it)

    @property
    def name(self) -> str:
        """`Class.method` (the span id without its uuid)."""
        return span_name(self.id)


class _Root:
    """A root request: counts what is still running under it and what to write at the end."""

    __slots__ = (
        "answer",
        "end",
        "errors",
        "finalized",
        "hold",
        "input",
        "kind",
        "last_llm_text",
        "last_seen",
        "llm_calls",
        "multi_agent",
        "node",
        "omitted",
        "open",
        "pending",
        "sampled",
        "shown",
        "stream_done",
        "stream_err",
        "stream_ref",
        "streams",
        "tokens",
    )

    def __init__(self, node: _Node, kind: str, sampled: bool, input_: str, now: float) -> None:
        self.node = node
        self.kind = kind
        self.open = 0
        self.pending = 0  # LLM calls in flight (streams outlive their spans)
        self.hold = 0  # a streaming result not yet consumed
        self.sampled = sampled
        self.input = input_
        self.answer: str | None = None
        self.last_llm_text: str | None = None
        self.finalized = False
        self.last_seen = now
        self.errors: list[BaseException] = []
        self.tokens = 0
        self.llm_calls = 0
        self.streams = 0  # streamed LLM calls finished under this request
        # a stream of this request that failed before the request's own span returned (read
        # by a thread of LlamaIndex's, e.g. a chat engine's): the request fails if it returns
        # a stream
        self.stream_err: str | None = None
        # LlamaIndex's own thread or task finished writing a chat response's stream
        self.stream_done = False
        # the stream the request returned, weakly: dropped unread, it ends the request
        self.stream_ref: weakref.ref[Any] | None = None
        self.shown = 1
        self.omitted = 0
        self.end: float | None = None
        # an AgentWorkflow's run: its agent steps say which agent runs them
        self.multi_agent = any(c.__name__ == "AgentWorkflow" for c in type(node.inst).__mro__)


class _Call:
    """An LLM call between its start and end events."""

    __slots__ = (
        "body",
        "claimed",
        "deltas",
        "first",
        "inner",
        "last",
        "messages",
        "model",
        "nested",
        "node",
        "outer",
        "prompt",
        "root",
        "start",
        "tools",
    )

    def __init__(self, start: float, node: _Node | None, nested: bool) -> None:
        self.start = start
        self.first: float | None = None
        self.last: Any = None
        # a stream's chunks as the application read them: () before the first (no list for
        # the calls that never stream), None after a chunk without a text delta
        self.deltas: list[str] | tuple[()] | None = ()
        self.prompt: str | None = None
        self.messages: Any = None
        self.tools: list[str] = []
        self.model: dict[str, Any] = {}
        self.node = node
        self.root = node.root if node is not None else None
        self.nested = nested
        self.claimed = False  # an async stream whose sync body has started (see `_outer_stream`)
        # the async stream it returned, weakly: an unread stream the app dropped must be freed
        self.body: weakref.ref[Any] | None = None
        self.outer: _Call | None = None  # a nested call: the call it is part of
        # provider usage reported by calls nested in this one (a structured LLM's inner call)
        self.inner: TokenCounts | None = None


_GENERATION_PARAMS = ("model", "temperature", "max_tokens", "max_new_tokens",
                      "max_completion_tokens", "max_output_tokens", "top_p", "top_k", "seed",
                      "frequency_penalty", "presence_penalty", "max_retries", "timeout",
                      "reasoning_effort", "api_version")
_SECRETISH = ("key", "token", "secret", "password", "auth", "header", "credential")
# token limits and counts (`max_tokens`, `max_new_tokens`, `num_output_tokens`) are not secrets
_TOKEN_COUNT = re.compile(r"(max|min|num)_(\w+_)?tokens")


def _secretish(key: str) -> bool:
    low = key.lower().replace("tokenizer", "")  # (`tokenizer_name` names no credential)
    return any(s in low for s in _SECRETISH) and not _TOKEN_COUNT.fullmatch(low)


def _model_params(model_dict: dict[str, Any], metadata: Any, cls: str | None = None
                  ) -> tuple[str, dict[str, Any]]:
    """(model name, scalar parameters without secrets) for the run's `llm_models` param."""
    params: dict[str, Any] = {}
    if metadata is not None:
        try:
            params.update(metadata.model_dump())
        except Exception:
            pass
    for key, value in model_dict.items():
        params.setdefault(key, value)
    params = {
        k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()
        if isinstance(v, (str, int, float, bool)) and not _secretish(k)
    }
    params = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
    if cls is not None:
        params.setdefault("python_class", cls)
    return _model_key(params, cls), params


def _model_key(params: dict[str, Any], cls: str | None = None) -> str:
    """The model's name; without one, the application's LLM class (LlamaIndex's `class_name`
    is a base class's for most custom LLMs: `custom_llm`, shared by all of them)."""
    for key in ("model", "model_name"):
        value = params.get(key)
        if isinstance(value, str) and value and value != "unknown":
            return value
    return cls or str(params.get("class_name") or "unknown")


class Observer:
    """Turns dispatcher spans and events into records; never raises into LlamaIndex."""

    def __init__(self, submit_many: SubmitMany, policy: ContentPolicy | None = None,
                 ignored: frozenset[str] | set[str] = frozenset()) -> None:
        self._emit = submit_many  # hands a list of records to the writer
        self.policy = policy or ContentPolicy()
        self.ignored = frozenset(ignored)
        self.handler_errors = 0
        self._lock = threading.RLock()
        self._spans: dict[str, _Node] = {}
        self._roots: dict[str, _Root] = {}
        self._calls: dict[str | None, _Call] = {}
        # Start events waiting for their end, oldest first: one span may start several at
        # once (an async embedding batch sends every batch's start before the first end).
        self._timed: dict[tuple[str, str | None], list[tuple[float, Any]]] = {}
        self._llm_steps = itertools.count()
        # A request's question, answer, latency and trace share one step per request kind,
        # so they line up in Aim even when one of them is missing (a failed request's answer).
        self._request_steps: dict[str, itertools.count[int]] = {}
        # Likewise the records of one retrieval (per retriever class), rerank or tool call (per
        # tool): a `top_score` missing where nodes have no scores, a text not sampled, must not
        # shift the next call's values onto this one's step.
        self._component_steps: dict[str, itertools.count[int]] = {}
        # open node postprocessor spans (LLMRerank, a similarity cutoff …): the nodes they were
        # given, as they were then (some change them in place), for their values at exit —
        # unless a ReRank event of theirs recorded them (then the entry is gone)
        self._postprocessing: dict[str, tuple[int, Any, Any]] = {}
        self._models: dict[str, dict[str, Any]] = {}
        self._seen_models: set[str] = set()
        self._next_sweep = _now() + SWEEP_INTERVAL
        self._kinds: dict[type, str] = {}
        # errors recorded under each running tool span (its own LLM call's, say): a tool that
        # then fails, or returns an error, is not counted again; a sibling's do not count
        self._tool_errors: dict[str, int] = {}
        self._classes = _component_classes()
        # streams the application dropped (weakref callbacks, from whichever thread let go of
        # them): their calls and requests are ended at the next span, under the lock
        self._dropped: collections.deque[tuple[Any, float]] = collections.deque()
        # called at each new request (autoinstrument: follow `Settings.callback_manager`)
        self.on_new_request: Callable[[], None] | None = None
        # The event handler routes by class name (`dispatcher.AimEventHandler.handle`).
        self.routes: dict[str, Callable[[Any, float], None]] = {
            "LLMChatStartEvent": self._llm_start,
            "LLMCompletionStartEvent": self._llm_start,
            "LLMChatInProgressEvent": self._llm_progress,
            "LLMCompletionInProgressEvent": self._llm_progress,
            "LLMChatEndEvent": self._llm_end,
            "LLMCompletionEndEvent": self._llm_end,
            "EmbeddingStartEvent": self._timed_start,
            "SparseEmbeddingStartEvent": self._timed_start,
            "EmbeddingEndEvent": self._embedding_end,
            "SparseEmbeddingEndEvent": self._embedding_end,
            "RetrievalStartEvent": self._timed_start,
            "RetrievalEndEvent": self._retrieval_end,
            "ReRankStartEvent": self._timed_start,
            "ReRankEndEvent": self._rerank_end,
            "ExceptionEvent": self._exception,
            # Workflows swallow a step's (or a run's) cancellation and say so with this event
            # before the span exits normally.
            "SpanCancelledEvent": self._span_cancelled,
            "StreamChatEndEvent": self._stream_done,
            "StreamChatErrorEvent": self._stream_done,
        }

    # -- helpers ----------------------------------------------------------------------
    @property
    def _defer_tokens(self) -> bool:
        """Count tokens in the writer unless the app installed its own tokenizer."""
        return can_defer()

    def _off(self, family: str) -> bool:
        return IGNORE_NAMES.get(family, family) in self.ignored

    def _kind(self, instance: Any) -> str:
        cls = type(instance)
        kind = self._kinds.get(cls)
        if kind is None:
            kind = next((k for c, k in self._classes if isinstance(instance, c)), "")
            self._kinds[cls] = kind
        return kind

    def _text(self, out: list[Record], name: str, value: Any, ctx: dict[str, Any],
              step: int | None = None, sampled: bool = True) -> None:
        if not sampled:
            return
        text = self.policy.text(value)
        if text is not None:
            out.append(Track(name, text, "text", ctx, step))

    def _error(self, out: list[Record], kind: str, name: str, err: BaseException) -> None:
        if self._off("errors"):
            return
        out.append(Track("errors", 1, "metric", {"kind": kind}))
        out.append(LogError(
            f"{kind} failed: {type(err).__name__}",
            # not "message": Aim's LogRecord takes that name for the log line itself; the
            # writer adds the redacted, cut exception message as "error"
            {"operation": kind, "span": name, "exception_type": type(err).__name__},
            error_message(err),
        ))

    def submit(self, record: Record) -> None:
        """Hand one record to the writer."""
        self._emit([record])

    def failed(self, where: str, exc: BaseException) -> None:
        """Count and report (once per kind) a failure inside the observer itself."""
        self.handler_errors += 1
        warn_once(f"observer:{where}:{type(exc).__name__}",
                  "could not record a LlamaIndex %s (%s: %s); the application continues",
                  where, type(exc).__name__, exc)
        try:
            self.submit(Track("handler_errors", self.handler_errors, "metric",
                              {"kind": "dispatcher"}))
        except Exception:
            pass

    # -- spans ------------------------------------------------------------------------
    # The hot path: LlamaIndex calls these for every decorated method (~28 times per RAG
    # query), so they only link nodes; texts are formatted later, in the writer.
    def span_enter(self, id_: str, bound_args: Any, instance: Any = None,
                   parent_id: str | None = None, tags: Any = None, **kwargs: Any) -> None:
        """A decorated method started: attach it to its parent (or start a new request)."""
        try:
            now = _now()
            if instance is None:
                kind = ""
            else:
                kind = self._kinds.get(type(instance))  # type: ignore[assignment]
                if kind is None:
                    kind = self._kind(instance)
            out: list[Record] | None = None
            with self._lock:
                if self._dropped:
                    # (before the sweep: a stream dropped more than ROOT_TTL ago was abandoned
                    # then, not expired now)
                    out = self._reap_dropped(now)
                if now >= self._next_sweep or len(self._roots) > MAX_OPEN_ROOTS:
                    out = (out or []) + self._sweep(now)
                parent = self._spans.get(parent_id) if parent_id else None
                if parent is None:
                    parent = self._late_parent(id_, kind, parent_id, instance, bound_args)
                    if (parent is None and kind in REQUEST_KINDS
                            and span_name(id_).rsplit(".", 1)[-1] in _NOT_REQUESTS):
                        kind = ""  # (a chat engine's `reset()`: no question, no answer)
                elif kind == "llm" and parent.root.kind not in REQUEST_KINDS:
                    # a streaming query read inside the application's own span (a web
                    # handler's `@dispatcher.span`, a tool called directly): the stream's
                    # call is the query's, not the wrapper's
                    parent = self._awaited_stream(id_) or parent
                node = _Node(id_, kind, parent, now, instance)
                if parent is None or (kind in REQUEST_KINDS
                                      and parent.root.kind not in REQUEST_KINDS):
                    # (a query under `run_jobs`, a user's `@dispatcher.span` function or a
                    # tool called directly is a request of its own: the wrapper is not one)
                    root = self._new_root(node, bound_args, now)
                else:
                    root = parent.root
                    if instance is None and parent.kind in _RUNS:
                        node.kind = kind = parent.kind + "_step"
                        if kind == "agent_step" and root.multi_agent:
                            # which agent of an AgentWorkflow runs this step (the LLM calls
                            # under it are that agent's)
                            agent = getattr(bound_args.arguments.get("ev"),
                                            "current_agent_name", None)
                            if isinstance(agent, str):
                                node.note += f" agent={agent[:80]}"
                    shown_parent = parent.disp or parent
                    same = instance is not None and (
                        shown_parent.inst_id == node.inst_id
                        # (the async adapter LlamaIndex wraps a sync-only tool in)
                        or (kind == "tool" and shown_parent.kind == "tool"
                            and getattr(shown_parent.inst, "__dict__", {}).get("base_tool")
                            is instance))
                    node.nested = same
                    if (not same and parent.disp is not None and parent.kind == kind
                            and instance is not None and parent.inst_id == node.inst_id):
                        # a hidden wrapper of this same object (`FunctionTool.__call__` ->
                        # `call`): this call is the one shown and recorded, not both
                        parent.nested = True
                    # private methods (`Class._method-<uuid>`) are hidden, except a node
                    # postprocessor's (LlamaIndex spans only its `_postprocess_nodes`)
                    if kind and not same and (id_[id_.rfind(".", 0, len(id_) - 37) + 1] != "_"
                                              or kind == "postprocess"):
                        if root.shown < MAX_TRACE_NODES:
                            children = shown_parent.children
                            if children is None:
                                shown_parent.children = [node]
                            else:
                                children.append(node)
                            root.shown += 1
                        else:
                            # not listed: shown as itself, nowhere (the calls under it fold
                            # into it, and its notes go nowhere, not onto the line above)
                            root.omitted += 1
                            node.disp = node
                    else:
                        node.disp = shown_parent
                node.root = root
                if kind == "tool":
                    self._tool_errors[id_] = 0
                    step = parent  # (marked even when the trace is full: no tree walk)
                    while step is not None and step.kind not in _STEP_KINDS:
                        step = step.parent
                    if step is not None:
                        step.ran_tool = True
                elif kind == "postprocess" and not node.nested and not self._off("rerank"):
                    self._postprocessing[id_] = self._nodes_given(bound_args, root.sampled)
                root.open += 1
                root.last_seen = now
                self._spans[id_] = node
            if out:
                self._emit(out)
        except Exception as exc:  # never into LlamaIndex (it would swallow it silently)
            self.failed("span start", exc)

    def _late_parent(self, id_: str, kind: str, parent_id: str | None, instance: Any,
                     bound_args: Any) -> _Node | None:
        """The node a span without a live parent span belongs to, if it is part of a request
        that is still waiting for a stream; None for a new request (lock held)."""
        if parent_id:
            # A request that returned a stream is still open: a thread it started may
            # enter its first span only after the request's own span has exited.
            waiting_root = self._roots.get(parent_id)
            if waiting_root is not None:
                return waiting_root.node
        if kind == "llm" and instance is not None:
            try:
                arguments = bound_args.arguments
            except Exception:
                arguments = {}
            outer = self._outer_stream(id(instance), span_name(id_), arguments.get("prompt"),
                                       arguments.get("messages"))
            if outer is not None:
                return outer.node  # the body of an async stream, run as it is consumed
            reading = self._stream_being_read(0)
            if reading is not None and reading.node is not None:
                return reading.node  # called by another LLM's stream as it is read
        if kind == "llm":
            return self._awaited_stream(id_)
        return None

    def _awaited_stream(self, id_: str) -> _Node | None:
        """The request waiting for this LLM stream's span, if it is the deferred stream of a
        streaming query being read in this context (lock held)."""
        if "stream" not in span_name(id_).rsplit(".", 1)[-1]:
            return None
        waiting = _awaiting.get()
        if (waiting is not None and not waiting.finalized and waiting.hold > 0
                and not waiting.pending
                # (none of its own yet; or a followed stream, read now: its last call)
                and (not waiting.streams or waiting.stream_ref is not None)):
            waiting.hold = 0
            _awaiting.set(None)
            return waiting.node
        return None

    def _new_root(self, node: _Node, bound_args: Any, now: float) -> _Root:
        """A span with no parent: a new request (lock held)."""
        if self.on_new_request is not None:
            try:
                self.on_new_request()
            except Exception as exc:
                self.failed("new request", exc)
        input_ = ""
        if node.kind in REQUEST_KINDS:
            try:
                input_ = render.input_text(dict(bound_args.arguments))
            except Exception:
                input_ = ""
        root = _Root(node, node.kind, self.policy.sample(), input_, now)
        self._roots[node.id] = root
        return root

    def _end_node(self, id_: str, now: float) -> tuple[_Node, Any, _Root] | None:
        """Forget a finished span: its node, the instance it ran on, and its request (lock held)."""
        node = self._spans.pop(id_, None)
        if node is None:
            return None
        node.end = now
        node.inst, instance = None, node.inst
        root = node.root
        root.last_seen = now
        return node, instance, root

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None,
                  **kwargs: Any) -> None:
        """A decorated method returned: step/tool records; the request may be complete.

        (`instance` is LlamaIndex's keyword; the node kept the instance since its start.)"""
        try:
            now = _now()
            out: list[Record] | None = None
            with self._lock:
                node = self._spans.pop(id_, None)
                if node is None:
                    return
                node.end = now
                instance = node.inst
                node.inst = None
                root = node.root
                root.last_seen = now
                kind = node.kind
                if kind in _SPECIAL_EXIT:
                    out = []
                    try:
                        if kind == "tool":
                            under = self._tool_errors.pop(id_, 0)
                            if not node.nested:
                                failed = self._tool(out, node, instance, bound_args, result,
                                                    None, counted=under > 0)
                                if failed is not None and under == 0:
                                    # (an error output: `predict_and_call`'s ValueError made
                                    # of it is not new; the tools above still count their own)
                                    root.errors.append(failed)
                                    del root.errors[:-8]
                        elif kind == "postprocess":
                            given = self._postprocessing.pop(id_, None)
                            if given is not None and isinstance(result, list):
                                self._reranks(out, type(instance).__name__, given, result,
                                              now - node.start, node.root.sampled)
                        else:
                            if not self._off(kind):
                                ctx = {"kind": kind, "step": node.name.rsplit(".", 1)[-1]}
                                out.append(Track("latency_ms", (now - node.start) * 1000.0,
                                                 "metric", ctx))
                            if type(result).__name__ == "ToolCallResult":
                                self._tool_not_run(out, node, result)
                    except Exception as exc:  # the request must still end
                        self.failed("span end", exc)
                elif kind == "llm" and type(result) in _STREAMS:
                    call = self._calls.get(id_)
                    if call is not None:
                        # (an async stream's body runs under its frame: `_outer_stream`)
                        call.body = weakref.ref(result, _when_dropped(self._dropped, id_))
                if node is root.node:
                    root.end = now
                    if kind in ANSWER_KINDS:
                        try:
                            answer = render.answer_text(result)
                        except Exception as exc:  # (a result whose str() raises)
                            self.failed("answer", exc)  # the request must still end
                            answer = None
                        # (a workflow's run ends with its StopEvent, which may hold a stream)
                        result = render.stop_result(result)
                        if root.stream_err is not None and render.is_streaming(result):
                            node.status = root.stream_err  # its stream failed already
                        elif answer is not None:
                            root.answer = answer
                        elif (render.is_streaming(result) and not root.pending
                              and (not root.streams or _unread(result)
                                   # (a chat response LlamaIndex's thread is still writing)
                                   or (_read_by_llamaindex(result)
                                       and not root.stream_done))):
                            # the stream has not run yet: wait for it (its LLM call, or expiry);
                            # streamed calls may have run already (a refine synthesizer reads
                            # the intermediate ones itself), the last one runs as it is read
                            root.hold = 1
                            read_by_llamaindex = _read_by_llamaindex(result)
                            if read_by_llamaindex:
                                _when_written(result, root, self._dropped)
                            if (not _follow_stream(result, root, self._stream_ended,
                                                   self._dropped)
                                    and not read_by_llamaindex):
                                if kind in ("query", "chat"):
                                    _awaiting.set(root)  # (the caller's context reads it)
                                else:  # a run's exit is in its own task: nothing would join
                                    root.hold = 0
                elif root.hold and kind == "" and node.name.endswith(_WRITES_HISTORY):
                    self._written(root)
                root.open -= 1
                if root.open <= 0 and not root.pending and not root.hold and not root.finalized:
                    finished = self._finish(root, now, None)
                    out = finished if out is None else out + finished
            if out:
                self._emit(out)
        except Exception as exc:  # never into LlamaIndex (it would swallow it silently)
            self.failed("span end", exc)

    def span_drop(self, id_: str, bound_args: Any, instance: Any = None,
                  err: BaseException | None = None, **kwargs: Any) -> None:
        """A decorated method raised: error records once per exception, status in the trace."""
        try:
            now = _now()
            out: list[Record] = []
            with self._lock:
                ended = self._end_node(id_, now)
                if ended is None:
                    return
                under = self._tool_errors.pop(id_, 0)
                self._postprocessing.pop(id_, None)
                node, instance, root = ended
                waiting = err is not None and pausing(err)
                cancelled = err is None or _cancelled(err) or waiting
                node.status = ("waiting" if waiting else "cancelled" if cancelled
                               else f"error {type(err).__name__}")
                call = self._calls.pop(id_, None)
                timed = [(family, self._timed.pop((family, id_), None))
                         for family in ("embedding", "retrieve", "rerank")]
                recorded = err is not None and (
                    any(e is err for e in root.errors)
                    or (node.kind == "llm" and _repeats_tool_errors(err, node.name,
                                                                    root.errors)))
                if call is not None:
                    if not call.nested and call.root is not None:
                        call.root.pending -= 1
                    recorded = True
                try:
                    if call is not None:
                        if not call.nested:  # a nested call's failure is recorded by the outer
                            self._llm_records(out, call, call.last, now, err)
                    elif node.kind == "tool" and not node.nested:
                        counted = recorded or under > 0
                        recorded = not waiting
                        self._tool(out, node, instance, bound_args, None, err, counted)
                    elif (node.kind in ERROR_KINDS and not recorded and not cancelled
                          and err is not None):
                        recorded = True
                        self._error(out, node.kind, node.name, err)
                    for family, starts in timed:
                        if starts:  # (their end events never come)
                            self._unended(out, family, id_, starts, now)
                    if node.kind in _STEP_KINDS and not self._off(node.kind):
                        # every step run has its latency; how it ended is in the trace
                        ctx = {"kind": node.kind, "step": node.name.rsplit(".", 1)[-1]}
                        out.append(Track("latency_ms", (now - node.start) * 1000.0, "metric",
                                         ctx))
                except Exception as exc:  # the request must still end
                    self.failed("span error", exc)
                if recorded and err is not None and not any(e is err for e in root.errors):
                    self._note_error(root, err, node)
                if node is root.node:
                    root.end = now
                elif root.hold and node.kind == "" and node.name.endswith(_WRITES_HISTORY):
                    self._written(root)
                root.open -= 1
                out.extend(self._maybe_finish(root, now))
            if out:
                self._emit(out)
        except Exception as exc:  # never into LlamaIndex (it would swallow it silently)
            self.failed("span error", exc)

    def _unended(self, out: list[Record], family: str, span_id: str,
                 starts: list[tuple[float, Any]], now: float) -> None:
        """The latency of an embedding or retrieval whose span raised before its end event:
        each call has one, as a failed LLM call or tool does. Only where one call was
        waiting: of an async batch's several, which failed is not known (the others still
        run), and a rerank's records need its end event's nodes."""
        if family == "rerank" or len(starts) != 1:
            return
        if family == "retrieve":
            retriever = _retriever_name(span_id)
            ctx = {"kind": family, "retriever": retriever}
            step = _next_step(self._component_steps, "retrieve:" + retriever)
        else:
            ctx = {"kind": family}
            step = _next_step(self._component_steps, family)
        out.append(Track("latency_ms", (now - starts[0][0]) * 1000.0, "metric", ctx, step))

    def _reap_dropped(self, now: float) -> list[Record]:
        """End the LLM calls and requests whose stream the application dropped before it ran
        out (never read: nothing else would ever end them), as abandoned (lock held)."""
        out: list[Record] = []
        root: _Root | None
        while self._dropped:
            item, at = self._dropped.popleft()
            # (timed to when the app let go of it, not to now: the next span may come hours
            # later in a quiet service)
            at = min(at, now)
            if isinstance(item, _Root):
                root = item
                if root.finalized or not root.hold:
                    continue  # (it ended as it was read or closed)
                if _expired(root, at):  # kept idle past the TTL, then dropped
                    out.extend(self._expire([root], at, EXPIRED))
                    continue
                root.hold = 0
            else:
                call = self._calls.get(item)
                if call is None or call.nested:
                    continue  # (it ended: read to the end, or closed part-way)
                if call.root is not None and _expired(call.root, at):
                    out.extend(self._expire([call.root], at, EXPIRED))
                    continue
                del self._calls[item]
                try:
                    self._llm_records(out, call, call.last, at, GeneratorExit())
                except Exception as exc:  # the request must still end
                    self.failed("dropped stream", exc)
                root = call.root
                if root is None:
                    continue
                root.pending -= 1
            if root.node.end is not None and root.node.status == "ok":
                root.node.status = "abandoned"
            out.extend(self._maybe_finish(root, max(at, root.last_seen)))
        return out

    # -- events -----------------------------------------------------------------------
    def _llm_start(self, event: Any, now: float) -> None:
        # (an ignored `llm` is still followed, unrecorded: a streaming request's answer and
        # end come from its LLM call)
        sid = event.span_id
        with self._lock:
            node = self._spans.get(sid) if sid else None
            outer: _Call | None = None
            p = node.parent if node is not None else None
            while p is not None:
                outer = self._calls.get(p.id)
                if outer is not None:
                    break
                p = p.parent
            fields = event.__dict__  # a pydantic event: getattr on a missing field is slow
            if outer is None and node is not None and node.inst_id:
                outer = self._outer_stream(node.inst_id, node.name, fields.get("prompt"),
                                           fields.get("messages"))
            if outer is None:
                outer = self._stream_being_read(1)  # (1: the dispatch of this very event)
            nested = outer is not None
            call = _Call(now, node, nested)
            call.outer = outer
            if not nested:
                call.prompt = fields.get("prompt")
                call.messages = fields.get("messages")
                extra = fields.get("additional_kwargs") or {}
                tools = extra.get("tools") if isinstance(extra, dict) else None
                if isinstance(tools, list):
                    call.tools = [render.tool_name(t) for t in tools[:50]]
                model_dict = fields.get("model_dict") or {}
                call.model = model_dict if isinstance(model_dict, dict) else {}
                if not self._off("llm"):
                    self._model_param(call, node)
                if call.root is not None:
                    call.root.pending += 1
                    call.root.last_seen = now
            self._calls[sid] = call

    def _outer_stream(self, inst_id: int, name: str, prompt: Any, messages: Any
                      ) -> _Call | None:
        """The async stream call whose body this LLM call is, claimed by it (lock held).

        `CustomLLM.astream_chat` returns a generator that calls `stream_chat` on the same LLM
        with the same messages when it is consumed, outside the span that returned it (often
        after the request's own span ended, or in no span at all). That inner call belongs to
        the outer one: the oldest unclaimed call of `astream_X` on this instance, with this
        prompt (or these messages), whose stream has not started, for an inner `stream_X`.
        Other calls of the same LLM meanwhile, and several streams opened before any is read,
        stay calls of their own. The outer call whose returned stream is running on this
        thread's stack is the one, whatever order the streams are read in; else the oldest
        with this prompt (a body run elsewhere).
        """
        cls, _, method = name.rpartition(".")
        outer_name = f"{cls}.a{method}"
        candidates = [
            call for call in self._calls.values()
            if (call.node is not None and not call.claimed and not call.nested
                and call.first is None and call.node.end is not None
                and call.node.inst_id == inst_id and call.node.name == outer_name)
        ]
        if not candidates:
            return None
        if any(call.body is not None for call in candidates):
            frames: list[types.FrameType] = []
            frame: types.FrameType | None = sys._getframe(1)
            while frame is not None and len(frames) < 200:
                frames.append(frame)
                frame = frame.f_back
            for call in candidates:
                stream = call.body() if call.body is not None else None
                body = getattr(stream, "ag_frame", None)
                if body is not None and any(f is body for f in frames):
                    call.claimed = True
                    return call
        for call in candidates:  # (a body run elsewhere: a thread of the LLM's, say)
            if (call.prompt == prompt if call.prompt is not None
                    else call.messages is messages or call.messages == messages):
                call.claimed = True
                return call
        return None

    def _stream_being_read(self, own_dispatches: int) -> _Call | None:
        """The LLM call whose returned stream is being read on this thread's stack, innermost
        first (lock held). A structured LLM's `stream_chat` returns a stream whose body calls
        the wrapped LLM only as it is read, after its own span ended: that call is part of it.
        The application's own calls between two chunks run outside the stream's frame; those
        an event or callback handler makes (the stream dispatches its chunks' events) are
        behind a dispatch on the stack: `own_dispatches` is how many are the caller's own."""
        bodies: dict[int, _Call] | None = None
        for call in self._calls.values():
            if call.body is not None:
                stream = call.body()
                frame = getattr(stream, "gi_frame", None) or getattr(stream, "ag_frame", None)
                if frame is not None:
                    if bodies is None:
                        bodies = {}
                    bodies[id(frame)] = call
        if bodies is None:
            return None
        dispatches = _dispatch_codes()
        caller: types.FrameType | None = sys._getframe(1)
        depth = 0
        while caller is not None and depth < 200:
            found = bodies.get(id(caller))
            if found is not None:
                return found
            if id(caller.f_code) in dispatches:  # (a code's hash walks its constants)
                if own_dispatches <= 0:
                    return None  # a handler's own call, made while the stream ran
                own_dispatches -= 1
            caller = caller.f_back
            depth += 1
        return None

    def _model_param(self, call: _Call, node: _Node | None) -> None:
        inst = node.inst if node is not None else None
        cls = type(inst).__name__ if inst is not None else None
        key = _model_key(call.model, cls)
        if key in self._seen_models:
            return
        self._seen_models.add(key)
        metadata = None
        model = dict(call.model)
        if node is not None and node.inst is not None:
            try:
                metadata = node.inst.metadata
            except Exception:
                metadata = None
            for attr in _GENERATION_PARAMS:  # an allow-list: never credentials or headers
                value = getattr(node.inst, attr, None)
                if isinstance(value, (str, int, float, bool)):
                    model.setdefault(attr, value)
        name, params = _model_params(model, metadata, cls)
        self._models[name] = params
        if len(self._models) <= 100:
            self.submit(Param("llm_models", {k: dict(v) for k, v in self._models.items()}))

    def _llm_progress(self, event: Any, now: float) -> None:
        call = self._calls.get(event.span_id)
        if call is not None:
            if call.first is None:
                call.first = now
            call.last = response = event.response
            deltas = call.deltas
            if deltas is not None:
                delta = getattr(response, "delta", None)
                if not isinstance(delta, str):
                    call.deltas = None
                elif isinstance(deltas, list):
                    deltas.append(delta)
                else:
                    call.deltas = [delta]
            if call.root is not None:
                call.root.last_seen = now

    def _llm_end(self, event: Any, now: float) -> None:
        with self._lock:
            call = self._calls.pop(event.span_id, None)
        if call is None:
            return
        if call.nested:
            _fold_usage(call, getattr(event, "response", None) or call.last)
            return
        out: list[Record] = []
        try:
            response = getattr(event, "response", None) or call.last
            self._llm_records(out, call, response, now, None)
        finally:  # even if its records failed: the request must not wait for this call
            root = call.root
            with self._lock:
                if root is not None:
                    root.last_seen = max(root.last_seen, now)  # (a dropped stream ends no later)
                    root.pending -= 1
                    if root.hold and root.node.end is not None:
                        root.hold = 0  # the stream of a streaming chat finished
                    out.extend(self._maybe_finish(root, now))
            self._emit(out)

    def _note_error(self, root: _Root, err: BaseException, node: _Node | None) -> None:
        """An exception recorded under `node`: the request's spans that end with it (or a tool
        above that returns an error for it) do not record it again (lock held)."""
        root.errors.append(err)
        del root.errors[:-8]
        if self._tool_errors:
            while node is not None:
                if node.kind == "tool" and node.id in self._tool_errors:
                    self._tool_errors[node.id] += 1
                node = node.parent

    def claim_error(self, err: BaseException) -> bool:
        """Whether the other channel (a callback event's exception payload) should record
        `err`: False when it is recorded already in this context's request; True otherwise,
        and then the request's spans that fail with it do not record it again."""
        with self._lock:
            node = self._current_node()
            if node is None:
                return True
            root = node.root
            if any(e is err for e in root.errors):
                return False
            self._note_error(root, err, node)
            return True

    def _span_cancelled(self, event: Any, now: float) -> None:
        """A workflow step or run was cancelled; its span will still exit normally."""
        span_id = getattr(event, "span_id", None)
        with self._lock:
            node = self._spans.get(span_id) if span_id else None
            if node is not None:
                node.status = "cancelled"

    def _exception(self, event: Any, now: float) -> None:
        """A failure (or `GeneratorExit`: an abandoned stream) while a stream was consumed."""
        with self._lock:
            call = self._calls.pop(event.span_id, None)
        if call is None or call.nested:
            return
        out: list[Record] = []
        err = event.exception
        try:
            self._llm_records(out, call, call.last, now, err)
        finally:  # even if its records failed: the request must not wait for this call
            root = call.root
            with self._lock:
                if root is not None:
                    root.last_seen = max(root.last_seen, now)  # (a dropped stream ends no later)
                    if isinstance(err, BaseException):
                        self._note_error(root, err, call.node)
                        status = _stream_status(err)
                        if call.first is not None and root.node.status == "ok":
                            # the stream a request returned failed (was cancelled, abandoned)
                            # as the app read it: so did the request (no answer), though its own span
                            # had returned (or, read by another thread, returns after this:
                            # `span_exit`)
                            if root.node.end is not None:
                                root.node.status = status
                            else:
                                root.stream_err = status
                    root.pending -= 1
                    root.hold = 0
                    out.extend(self._maybe_finish(root, now))
            self._emit(out)

    def _stream_ended(self, root: _Root, text: str) -> None:
        """A streaming request's response ran out and no LLM call joined it: it is complete."""
        try:
            with self._lock:
                if not root.hold or root.finalized:
                    return
                root.hold = 0
                if root.answer is None:
                    root.answer = text
                out = self._maybe_finish(root, _now())
            self._emit(out)
        except Exception as exc:
            self.failed("stream end", exc)

    def _written(self, root: _Root) -> None:
        """LlamaIndex's thread or task writing a chat response's stream is over, however it
        ended (an error before any event of its own, say): its request waits no more (lock
        held; the caller finishes the request)."""
        root.stream_done = True
        root.hold = 0

    def _stream_done(self, event: Any, now: float) -> None:
        with self._lock:
            node = self._spans.get(event.span_id) if event.span_id else None
            out = []
            if node is not None:  # (perhaps before its request's span returned)
                held = node.root.hold
                self._written(node.root)
                if held:
                    out = self._maybe_finish(node.root, now)
        self._emit(out)

    def _llm_records(self, out: list[Record], call: _Call, response: Any, now: float,
                     err: BaseException | None, unfinished: str | None = None) -> None:
        """prompt, response, latency, tokens (and ttft for streams) at one step; or the error.
        `unfinished`: the call never ended (the process shut down): prompt and what was read,
        marked so, and no latency or token counts."""
        root = call.root
        abandoned = isinstance(err, GeneratorExit)
        # Cancelled (a timeout, a client that went away): not a failure of the LLM.
        cancelled = err is not None and not abandoned and _cancelled(err)
        if self._off("llm"):  # no call records; its request still learns what it answered
            if err is not None and not abandoned and not cancelled:
                self._error(out, "llm", call.node.name if call.node else "llm", err)
            if root is not None:
                root.llm_calls += 1
                if call.first is not None:
                    root.streams += 1
                if response is not None:
                    root.last_llm_text = render.render_response(response)
            return
        step = next(self._llm_steps)
        sampled = root.sampled if root is not None else True
        capture = self.policy.capture and sampled
        ctx = {"kind": "llm"}
        counts = provider_counts(response) if response is not None else None
        if counts is None:
            counts = call.inner  # reported to the call nested in this one (a structured LLM)
        prompt_text = response_text = ""
        if capture or counts is None:
            if call.messages is not None:
                prompt_text = render.render_messages(call.messages)
            else:
                prompt_text = call.prompt or ""
            if call.tools:
                prompt_text += "\n[tools: " + ", ".join(call.tools) + "]"
            response_text = _streamed(call, render.render_response(response))
        if capture:
            self._text(out, "prompt", prompt_text, ctx, step)
            mark = None
            if err is not None:
                mark = ("[stream abandoned]" if abandoned else "[cancelled]" if cancelled
                        else f"[error: {type(err).__name__}]")
            elif unfinished is not None:
                mark = f"[{unfinished}]"
            # (on a line of its own after what was read; alone when nothing was)
            shown = response_text if mark is None else (
                f"{response_text}\n{mark}" if response_text else mark)
            self._text(out, "response", shown, ctx, step)
        latency = (now - call.start) * 1000.0
        if unfinished is not None:
            if call.node is not None:
                (call.node.disp or call.node).note += " llm incomplete"
            if root is not None:
                root.llm_calls += 1
            return
        out.append(Track("latency_ms", latency, "metric", ctx, step))
        if call.first is not None:
            out.append(Track("ttft_ms", (call.first - call.start) * 1000.0, "metric", ctx, step))
        if err is None or abandoned or response is not None:
            if counts is None and self._defer_tokens:
                # Tokenizing costs ~0.25 ms/KB: the writer counts; traces get a rough figure.
                tctx = {"kind": "llm", "source": "estimated"}
                out.append(Track("prompt_tokens", (prompt_text,), "token_estimate", tctx, step))
                out.append(Track("completion_tokens", (response_text,), "token_estimate", tctx,
                                 step))
                out.append(Track("total_tokens", (prompt_text, response_text), "token_estimate",
                                 tctx, step))
                p, c = rough(prompt_text), rough(response_text)
                counts = TokenCounts(p, c, p + c, "rough")
            else:
                if counts is None:
                    counts = estimated_counts(prompt_text, response_text)
                tctx = {"kind": "llm", "source": counts.source}
                out.append(Track("prompt_tokens", counts.prompt, "metric", tctx, step))
                out.append(Track("completion_tokens", counts.completion, "metric", tctx, step))
                out.append(Track("total_tokens", counts.total, "metric", tctx, step))
        if err is not None and not abandoned and not cancelled:
            self._error(out, "llm", call.node.name if call.node else "llm", err)
        node = call.node
        if node is not None:
            shown_node = node.disp or node
            note = f" llm {latency:.1f}ms"
            if counts is not None:
                approx = "~" if counts.source == "rough" else ""
                note += f" tokens={approx}{counts.prompt}+{approx}{counts.completion}"
            if call.first is not None:
                note = " stream" + note
            if abandoned:
                note += " abandoned"
            elif cancelled:
                note += " cancelled"
            elif err is not None:
                note += f" error {type(err).__name__}"
            shown_node.note += note
        if root is not None:
            root.llm_calls += 1
            if call.first is not None:
                root.streams += 1
            root.tokens += counts.total if counts is not None else 0
            if response_text:
                root.last_llm_text = response_text
            elif response is not None:
                root.last_llm_text = render.render_response(response)

    def _timed_start(self, event: Any, now: float) -> None:
        name = type(event).__name__
        family = ("embedding" if name.endswith("EmbeddingStartEvent")
                  else "retrieve" if name == "RetrievalStartEvent" else "rerank")
        if self._off(family):
            return
        waiting = self._timed.get((family, event.span_id))
        if waiting is None:
            self._timed[(family, event.span_id)] = [(now, event)]
        else:
            waiting.append((now, event))

    def _started(self, family: str, span_id: str | None) -> tuple[float, Any] | None:
        """The oldest start event of `family` in span `span_id` still waiting for its end."""
        waiting = self._timed.get((family, span_id))
        if not waiting:
            return None
        started = waiting.pop(0)
        if not waiting:
            self._timed.pop((family, span_id), None)
        return started

    def _sampled(self, span_id: str | None) -> bool:
        node = self._spans.get(span_id) if span_id else None
        return node.root.sampled if node is not None else True

    def _embedding_end(self, event: Any, now: float) -> None:
        started = self._started("embedding", event.span_id)
        if started is None:
            return
        chunks = event.chunks or []
        ctx = {"kind": "embedding"}
        step = _next_step(self._component_steps, "embedding")
        out: list[Record] = [
            Track("embedded_texts", len(chunks), "metric", ctx, step),
            Track("latency_ms", (now - started[0]) * 1000.0, "metric", ctx, step),
            Track("embedding_tokens", tuple(chunks), "token_estimate",
                  {"kind": "embedding", "source": "estimated"}, step)
            if self._defer_tokens
            else Track("embedding_tokens", _estimate_many(chunks), "metric",
                       {"kind": "embedding", "source": "estimated"}, step),
        ]
        self._emit(out)

    def _retrieval_end(self, event: Any, now: float) -> None:
        started = self._started("retrieve", event.span_id)
        if started is None:
            return
        nodes = list(event.nodes or [])
        # The retriever's class keeps scales apart: cosine similarities, BM25 scores and a
        # fusion's reciprocal ranks in one `top_score` line would compare nothing.
        retriever = _retriever_name(event.span_id)
        ctx = {"kind": "retrieve", "retriever": retriever}
        step = _next_step(self._component_steps, "retrieve:" + retriever)
        scores = render.scores_of(nodes)
        out: list[Record] = [
            Track("retrieved_nodes", len(nodes), "metric", ctx, step),
            Track("latency_ms", (now - started[0]) * 1000.0, "metric", ctx, step),
        ]
        if scores:
            out.append(Track("top_score", max(scores), "metric", ctx, step))
            out.append(Track("retrieval_scores", scores, "distribution", ctx, step))
        if self.policy.capture and self._sampled(event.span_id):
            query = render.query_text(event.str_or_query_bundle)[: MAX_INPUT_LINE + MARGIN]
            value = NodesValue(query, render.node_rows(nodes), len(nodes))
            out.append(Track("retrieved", value, "text", ctx, step))
        node = self._spans.get(event.span_id) if event.span_id else None
        if node is not None:
            top = f" top={max(scores):.3f}" if scores else ""
            (node.disp or node).note += f" nodes={len(nodes)}{top}"
        self._emit(out)

    def _rerank_end(self, event: Any, now: float) -> None:
        started = self._started("rerank", event.span_id)
        if started is None:
            return
        node = self._spans.get(event.span_id) if event.span_id else None
        reranker = None
        at_start: tuple[int, Any, Any] | None = None
        while node is not None and node.kind == "postprocess":
            # its own events say it all: its span's exit (and that of the same object's
            # outer span: a subclass calling `super()._postprocess_nodes`) records nothing;
            # the nodes as its span was given them are the "before" (it may rescore in place)
            at_start = self._postprocessing.pop(node.id, None) or at_start
            inst = node.inst
            if inst is not None:
                reranker = type(inst).__name__
            parent = node.parent
            if parent is None or parent.inst_id != node.inst_id:
                break
            node = parent
        if reranker is None:  # (an async rerank runs in no span of its own: the caller's)
            reranker = self._postprocessor_on_stack()
        sampled = self._sampled(event.span_id)
        before = list(getattr(started[1], "nodes", None) or [])
        query = getattr(started[1], "query", None)
        if at_start is not None and at_start[0] == len(before):
            given = (len(before), at_start[1], query)
        else:
            given = (len(before), render.node_rows(before) if self.policy.capture and sampled
                     else None, query)
        out: list[Record] = []
        self._reranks(out, reranker, given, event.nodes, now - started[0], sampled)
        self._emit(out)

    def _nodes_given(self, bound_args: Any, sampled: bool) -> tuple[int, Any, Any]:
        """(how many, their rows, the query) of the nodes a postprocessor span was given; -1
        where they are not a list (nothing is recorded then)."""
        try:
            arguments = bound_args.arguments
        except Exception:
            return (-1, None, None)
        nodes = arguments.get("nodes")
        if not isinstance(nodes, list):
            return (-1, None, None)
        rows = render.node_rows(nodes) if self.policy.capture and sampled else None
        return (len(nodes), rows, arguments.get("query_bundle"))

    def _postprocessor_on_stack(self) -> str:
        """The class of the node postprocessor whose code is running on this thread's stack
        (an async rerank emits its events in its caller's span), or "unknown"."""
        frame: types.FrameType | None = sys._getframe(2)
        depth = 0
        while frame is not None and depth < 30:
            if "postprocess" in frame.f_code.co_name:
                inst = frame.f_locals.get("self")
                if inst is not None and self._kind(inst) == "postprocess":
                    return type(inst).__name__
            frame = frame.f_back
            depth += 1
        return "unknown"

    def _reranks(self, out: list[Record], reranker: str, given: tuple[int, Any, Any],
                 after: Any, seconds: float, sampled: bool) -> None:
        """The values of one rerank or node postprocessing, on one step per postprocessor
        class (an LLM's 1–10 relevance and a cross-encoder's logits are different scales).
        `given`: (how many nodes it was given, their rows as they were, the query)."""
        count, rows, query = given
        if count < 0:
            return
        after = list(after or [])
        ctx = {"kind": "rerank", "reranker": reranker}
        step = _next_step(self._component_steps, "rerank:" + reranker)
        out.append(Track("rerank_nodes_in", count, "metric", ctx, step))
        out.append(Track("rerank_nodes_out", len(after), "metric", ctx, step))
        out.append(Track("latency_ms", seconds * 1000.0, "metric", ctx, step))
        scores = render.scores_of(after)
        if scores:
            out.append(Track("top_score", max(scores), "metric", ctx, step))
        if self.policy.capture and sampled and rows is not None:
            query = render.query_text(query)[: MAX_INPUT_LINE + MARGIN]
            value = RerankValue(NodesValue(query, rows, count),
                                NodesValue(None, render.node_rows(after), len(after)))
            out.append(Track("reranked", value, "text", ctx, step))

    # -- tools ------------------------------------------------------------------------
    def _tool(self, out: list[Record], node: _Node, instance: Any, bound_args: Any,
              result: Any, err: BaseException | None, counted: bool = False
              ) -> BaseException | None:
        """latency, the `tool_call` text, and the tool's error — unless `counted`: recorded
        already under the tool (its own LLM call failed, say): one exception, counted once.
        Returns the error it ended with (an error output's stands for it), if any."""
        name = "tool"
        try:
            name = str(instance.metadata.name)
        except Exception:
            name = node.name.split(".", 1)[0]
        if err is None and getattr(result, "is_error", False):
            err = RuntimeError(str(getattr(result, "content", "tool error")))
        failed = err is not None and not _cancelled(err) and not pausing(err)
        if self._off("tool"):
            # its records are not wanted, its failure still is (`exception` governs errors)
            if err is not None and failed and not counted:
                self._error(out, "tool", name, err)
            return err if failed else None
        ctx = {"kind": "tool", "tool": name}
        step = _next_step(self._component_steps, "tool:" + name)
        if err is None or not pausing(err):  # (a paused attempt is no call's latency)
            latency = ((node.end or _now()) - node.start) * 1000.0
            out.append(Track("latency_ms", latency, "metric", ctx, step))
        if err is not None and _cancelled(err):
            node.status = "cancelled"
            output = "cancelled"
        elif err is not None and pausing(err):
            node.status = "waiting"
            output = "waiting for an event (the call runs again when it comes)"
        elif err is not None:
            if not counted:
                self._error(out, "tool", name, err)
            node.status = f"error {type(err).__name__}"
            output = f"error: {type(err).__name__}: {err}"
        else:
            content = getattr(result, "content", None)
            output = (content if isinstance(content, str)
                      else render.render_value(result, head=self.policy.redact_head))
        node.note += f" tool={name}"
        if self.policy.capture and node.root.sampled:
            try:
                arguments = dict(bound_args.arguments)
            except Exception:
                arguments = {}
            self._text(out, "tool_call", render.render_tool_call(
                name, arguments, output, self.policy.redact_head), ctx, step)
        return err if failed else None

    def _tool_not_run(self, out: list[Record], node: _Node, result: Any) -> None:
        """An agent's `call_tool` step that answered with an error without running a tool (the
        model named one that does not exist): its `tool_call` and error, which no tool span
        records."""
        output = getattr(result, "tool_output", None)
        if not getattr(output, "is_error", False) or node.ran_tool:
            return
        err = RuntimeError(str(getattr(output, "content", "tool error")))
        self._error(out, "tool", TOOL_NOT_FOUND, err)  # (errors follow `exception` alone)
        if self._off("tool"):
            return
        # The name is the model's output, not the application's: only in the `tool_call` text
        # (redacted) — a context value or trace note is stored as it is, and a model making up
        # names would make a sequence per name.
        name = str(getattr(result, "tool_name", "") or "tool")
        ctx = {"kind": "tool", "tool": TOOL_NOT_FOUND}
        step = _next_step(self._component_steps, "tool:" + TOOL_NOT_FOUND)
        node.note += f" tool={TOOL_NOT_FOUND} (not run: error)"
        if self.policy.capture and node.root.sampled:
            arguments = getattr(result, "tool_kwargs", None)
            self._text(out, "tool_call", render.render_tool_call(
                name, dict(arguments) if isinstance(arguments, dict) else {},
                f"error: {type(err).__name__}: {err}", self.policy.redact_head), ctx, step)

    # -- requests ---------------------------------------------------------------------
    def _maybe_finish(self, root: _Root, now: float) -> list[Record]:
        if root.finalized or root.open > 0 or root.pending > 0 or root.hold > 0:
            return []
        return self._finish(root, now, None)

    def _finish(self, root: _Root, now: float, status: str | None) -> list[Record]:
        root.finalized = True
        root.stream_ref = None  # (its callback refers back to the request)
        self._roots.pop(root.node.id, None)
        if self._calls:  # calls nested in this request's calls never end on their own when
            # their stream was dropped unclosed (an async stream's sync body): their outer
            # call has recorded them
            for call_id in [k for k, c in self._calls.items() if c.nested and c.root is root]:
                self._calls.pop(call_id, None)
        kind = root.kind
        out: list[Record] = []
        if kind not in REQUEST_KINDS:
            _release(root)
            return out
        # A request ends when the last thing under it ends (a stream may outlive the span);
        # an expired one at its last sign of activity; one cut off by shutdown ran until now.
        end = (now if status is None or (status == AT_SHUTDOWN and (root.open or root.pending))
               else (root.end or root.last_seen))
        latency = (end - root.node.start) * 1000.0
        ctx = {"kind": kind}
        step = _next_step(self._request_steps, kind)
        if kind in ANSWER_KINDS and not self._off(kind):
            if status is None:  # (an incomplete request's latency is not known: trace only)
                out.append(Track("latency_ms", latency, "metric", ctx, step))
            if self.policy.capture and root.sampled:
                self._text(out, "question", root.input, ctx, step)
                answer = root.answer
                if answer is None and status is None and root.node.status == "ok":
                    answer = root.last_llm_text  # (a failed request has no answer)
                if answer is not None:
                    self._text(out, "answer", answer, ctx, step)
        if root.sampled:
            out.append(Track("trace", self._trace_value(root, latency, status, now), "text",
                             ctx, step))
        _release(root)
        return out

    def _trace_value(self, root: _Root, latency: float, status: str | None,
                     now: float) -> TraceValue:
        """The request's span tree as rows; the writer formats and redacts it. At shutdown,
        spans still open show how long they had been running."""
        node = root.node
        input_ = root.input[: MAX_INPUT_LINE + MARGIN] if self.policy.capture else None
        rows: list[tuple[int, str, float, float | None, str, str]] = []
        stack: list[tuple[_Node, int]] = [(node, 0)]
        running = status == AT_SHUTDOWN
        while stack:
            current, depth = stack.pop()
            if running and current.end is None:
                rows.append((depth, current.id, current.start, now, "running", current.note))
            else:
                rows.append((depth, current.id, current.start, current.end, current.status,
                             current.note))
            if current.children:
                stack.extend((child, depth + 1) for child in reversed(current.children))
        return TraceValue(root.kind, input_, latency, status or node.status, root.llm_calls,
                          root.tokens, rows, root.omitted)

    # -- bounded state ----------------------------------------------------------------
    def _sweep(self, now: float) -> list[Record]:
        """Expire requests idle for `ROOT_TTL` (and the oldest beyond `MAX_OPEN_ROOTS`)."""
        self._next_sweep = now + SWEEP_INTERVAL
        # (an agent or workflow run still going is not idle: it may wait hours for a human's
        # answer, or on a step; it ends with the workflow's own timeout or cancellation)
        expired = [r for r in self._roots.values() if _expired(r, now)]
        excess = len(self._roots) - len(expired) - MAX_OPEN_ROOTS
        if excess > 0:
            expired.extend(list(self._roots.values())[:excess])
        # LLM calls and timed starts whose end never comes (a stream nobody closed) are not
        # expired by age: a long async embedding batch, or a stream read for longer than
        # ROOT_TTL, still ends and is recorded. Their number is capped instead (oldest first).
        for pending in (self._calls, self._timed):
            over = len(pending) - MAX_OPEN_ROOTS
            if over > 0:
                for key in list(itertools.islice(pending, over)):
                    pending.pop(key, None)  # type: ignore[arg-type]
        return self._expire(expired, now, EXPIRED)

    def _expire(self, roots: list[_Root], now: float, status: str) -> list[Record]:
        if not roots:
            return []
        out: list[Record] = []
        dead = {id(r) for r in roots}
        for span_id in [k for k, n in self._spans.items() if id(n.root) in dead]:
            self._spans.pop(span_id, None)
            self._postprocessing.pop(span_id, None)
            self._tool_errors.pop(span_id, None)
        for call_id in [k for k, c in self._calls.items() if c.root is not None and id(c.root) in dead]:
            self._calls.pop(call_id, None)
        for root in roots:
            if not root.finalized:
                out.extend(self._finish(root, now, status))
        return out

    def _current_node(self) -> _Node | None:
        """The span running in this context, if aim-llama tracks it."""
        span_id = _active_span_id().get()
        return self._spans.get(span_id) if span_id else None

    def _current_root(self) -> _Root | None:
        """The request of the span running in this context, if aim-llama tracks it."""
        node = self._current_node()
        return node.root if node is not None else None

    def repeats_chunks(self) -> bool:
        """Whether chunks made in this context only repeat text recorded elsewhere: inside a
        request, or inside a response synthesizer (re-splitting text for its prompts, which
        are recorded), wherever it runs (an index build's summaries, say)."""
        node = self._current_node()
        if node is None:
            return False
        if node.root.kind in REQUEST_KINDS:
            return True
        while node is not None:
            if node.kind == "synthesize":
                return True
            node = node.parent
        return False

    def current_sampled(self) -> bool:
        """Whether the request running in this context records texts (see `sample_rate`)."""
        root = self._current_root()
        return root.sampled if root is not None else True

    def open_state(self) -> dict[str, int]:
        """Sizes of the bookkeeping (for tests and diagnostics)."""
        with self._lock:
            return {"spans": len(self._spans), "roots": len(self._roots),
                    "calls": len(self._calls), "timed": len(self._timed)}

    def close(self) -> None:
        """Write the LLM calls and the traces of requests still open (marked incomplete) and
        free all state."""
        with self._lock:
            now = _now()
            out: list[Record] = self._reap_dropped(now)
            for call in list(self._calls.values()):
                if call.nested:
                    continue
                try:
                    self._llm_records(out, call, call.last, now, None, AT_SHUTDOWN)
                except Exception as exc:  # the rest must still be written
                    self.failed("llm call at shutdown", exc)
            out.extend(self._expire(list(self._roots.values()), now, AT_SHUTDOWN))
            self._spans.clear()
            self._calls.clear()
            self._timed.clear()
            self._postprocessing.clear()
            self._tool_errors.clear()
        self._emit(out)


def _streamed(call: _Call, text: str) -> str:
    """A stream's text as the application read it: some LLMs' last chunk (MockLLM's among
    them) carries the text *before* its own delta, one chunk short of what was streamed."""
    deltas = call.deltas
    if call.first is None or not deltas:
        return text
    streamed = "".join(deltas)
    return streamed if len(streamed) > len(text) and streamed.startswith(text) else text


def _unread(result: Any) -> bool:
    """Whether a streaming query's response holds a generator not started yet (nothing read).

    Only a generator the response holds itself (`StreamingResponse`): a chat response's
    `response_gen` is a property that makes a new one each time, unstarted whether or not
    LlamaIndex's own thread has read the stream already."""
    gen = getattr(result, "__dict__", {}).get("response_gen")
    if isinstance(gen, types.GeneratorType):
        return inspect.getgeneratorstate(gen) == inspect.GEN_CREATED
    if isinstance(gen, types.AsyncGeneratorType):
        state = getattr(inspect, "getasyncgenstate", None)  # (Python >= 3.12)
        if state is not None:
            return bool(state(gen) == "AGEN_CREATED")
        # (an unstarted frame's last instruction: -1 on Python 3.10, 0 on 3.11)
        frame = gen.ag_frame
        return frame is not None and not gen.ag_running and frame.f_lasti <= 0
    return False


# LlamaIndex's span around writing a chat response's stream (`write_response_to_history`,
# `awrite_response_to_history`), in its own thread or task
_WRITES_HISTORY = "write_response_to_history"


def _when_written(result: Any, root: _Root,
                  dropped: collections.deque[tuple[Any, float]]) -> None:
    """A chat response's history task that ends without running (cancelled before its first
    step: no span, no event) still ends the request, at the next span (`_reap_dropped`)."""
    task = getattr(result, "awrite_response_to_history_task", None)
    add = getattr(task, "add_done_callback", None)
    if add is not None:
        with contextlib.suppress(Exception):
            add(_when_dropped(dropped, root))


def _read_by_llamaindex(result: Any) -> bool:
    """Whether LlamaIndex reads this streaming chat response in a thread or task of its own
    (a chat engine's `write_response_to_history`): its LLM call then joins the request
    through its parent span, and the caller's next stream must not be taken for it."""
    return (getattr(result, "write_response_to_history_thread", None) is not None
            or getattr(result, "awrite_response_to_history_task", None) is not None)


def _follow_stream(result: Any, root: _Root,
                   ended: Callable[[_Root, str], None] | None = None,
                   dropped: collections.deque[tuple[Any, float]] | None = None) -> bool:
    """Make the LLM call of a streaming query's response join its request when it is read.

    A `StreamingResponse`'s generator makes its LLM call only when it is first read — in
    whichever thread and context reads it (a web server's other thread), and perhaps after a
    second query returned its own stream. The generator is wrapped so that, while it runs, it
    names its request to `span_enter`. False when `result` has no such generator.
    """
    gen = getattr(result, "response_gen", None)
    try:
        following: Any
        if isinstance(gen, types.GeneratorType):
            following = _following(gen, root, ended)
        elif isinstance(gen, types.AsyncGeneratorType):  # `aquery` with streaming=True
            following = _following_async(gen, root, ended)
        else:
            return False
        result.response_gen = following
        if dropped is not None:  # (dropped unread, it ends the request: `_reap_dropped`)
            root.stream_ref = weakref.ref(following, _when_dropped(dropped, root))
    except Exception:
        return False
    return True


_STREAMS = (types.GeneratorType, types.AsyncGeneratorType)


def _expired(root: _Root, now: float) -> bool:
    """Whether a request had been idle for ROOT_TTL at `now` (an agent or workflow run still
    going never expires: it may wait for a human as long as it likes)."""
    return now - root.last_seen > ROOT_TTL and (root.end is not None or root.kind not in _RUNS)


def _when_dropped(dropped: collections.deque[tuple[Any, float]], item: Any
                  ) -> Callable[[Any], None]:
    """A weakref callback that notes `item` (a call's key, or a request) as dropped, and when:
    it may run in any thread, in the middle of anything, so it only appends."""
    def note(_ref: Any) -> None:
        dropped.append((item, _now()))
    return note


class _Follow:
    """What following a sync and an async stream share: while an item is made, `span_enter`
    learns which request it belongs to (`_awaiting`); the texts are kept to end a request that
    no LLM call joined (LlamaIndex's "Empty Response" when nothing was retrieved)."""

    __slots__ = ("ended", "root", "texts")

    def __init__(self, root: _Root, ended: Callable[[_Root, str], None] | None) -> None:
        self.root = root
        self.ended = ended
        self.texts: list[str] = []

    def naming(self) -> contextvars.Token[_Root | None] | None:
        return _awaiting.set(self.root) if self.root.hold else None

    def named(self, token: contextvars.Token[_Root | None] | None) -> None:
        if token is not None:
            with contextlib.suppress(ValueError):  # (reset in another context)
                _awaiting.reset(token)

    def saw(self, item: Any) -> None:
        if self.root.hold and isinstance(item, str) and len(self.texts) < 1000:
            self.texts.append(item)

    def ran_out(self) -> None:
        if self.root.hold and self.ended is not None:
            self.ended(self.root, "".join(self.texts))


def _following(gen: Generator[Any, None, Any], root: _Root,
               ended: Callable[[_Root, str], None] | None = None
               ) -> Generator[Any, None, Any]:
    """`gen`, telling `span_enter` which request it belongs to while each item is made; and,
    when it runs out without an LLM call having joined, ending the request (`_Follow`)."""
    follow = _Follow(root, ended)
    try:
        while True:
            token = follow.naming()
            try:
                item = next(gen)
            except StopIteration as stop:
                follow.ran_out()
                return stop.value
            finally:
                follow.named(token)
            follow.saw(item)
            yield item
    finally:
        gen.close()


async def _following_async(gen: AsyncGenerator[Any, None], root: _Root,
                           ended: Callable[[_Root, str], None] | None = None
                           ) -> AsyncGenerator[Any, None]:
    """`_following` for an async generator: read in whichever task (a web framework's own,
    after other requests opened theirs), its LLM call still joins this request."""
    follow = _Follow(root, ended)
    try:
        while True:
            token = follow.naming()
            try:
                item = await gen.__anext__()
            except StopAsyncIteration:
                follow.ran_out()
                return
            finally:
                follow.named(token)
            follow.saw(item)
            yield item
    finally:
        await gen.aclose()


def _fold_usage(call: _Call, response: Any) -> None:
    """Add the provider usage of a nested call's response to its outer call's `inner`: the
    outer call's own response may carry none (a structured LLM returns the parsed object)."""
    outer = call.outer
    if outer is None:
        return
    counts = provider_counts(response) if response is not None else None
    if counts is None:
        counts = call.inner  # a call nested twice (`complete` → `chat` → the provider's)
        if counts is None:
            return
    was = outer.inner
    if was is not None:
        counts = TokenCounts(was.prompt + counts.prompt, was.completion + counts.completion,
                             was.total + counts.total, counts.source)
    outer.inner = counts


def _cancelled(err: BaseException) -> bool:
    """A call stopped from outside (asyncio cancellation, a closed generator), not a failure."""
    return isinstance(err, GeneratorExit) or type(err).__name__ == "CancelledError"


def _stream_status(err: BaseException) -> str:
    """How a request ends whose stream stopped with `err` while read: abandoned
    (`GeneratorExit`: the app stopped reading, a client went away), cancelled, or failed."""
    if isinstance(err, GeneratorExit):
        return "abandoned"
    return "cancelled" if _cancelled(err) else f"error {type(err).__name__}"


def _release(root: _Root) -> None:
    """Break a finished request's reference cycles (parent ↔ children, request ↔ root span):
    reference counting then frees its spans at once, and they never add to the work of the
    garbage collector, whose full collections of a LlamaIndex process take ~100 ms."""
    stack = [root.node]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children)
        node.children = None
    with contextlib.suppress(AttributeError):
        del root.node.root


def _estimate_many(texts: list[str]) -> int:
    """Estimated tokens of many texts, tokenizing at most ~100k characters."""
    budget = 100_000
    sample: list[str] = []
    total_chars = 0
    sampled_chars = 0
    for text in texts:
        n = len(text)
        total_chars += n
        if sampled_chars < budget:
            sample.append(text)
            sampled_chars += n
    if not sample:
        return 0
    count = estimate("\n".join(sample))
    if total_chars > sampled_chars and sampled_chars:
        count = round(count * total_chars / sampled_chars)
    return count


_span_var: Any = None


def _active_span_id() -> Any:
    """LlamaIndex's `active_span_id` context variable (imported once, not per call)."""
    global _span_var
    if _span_var is None:
        from llama_index.core.instrumentation.span import active_span_id

        _span_var = active_span_id
    return _span_var


def _next_step(counters: dict[str, itertools.count[int]], key: str) -> int:
    """The next step of the records counted under `key` (thread-safe under the GIL)."""
    counter = counters.get(key)
    if counter is None:
        counter = counters.setdefault(key, itertools.count())
    return next(counter)


@functools.cache
def _dispatch_codes() -> frozenset[int]:
    """The ids of the code of LlamaIndex's event dispatch and of its CallbackManager's, which
    run the application's handlers (the code objects live as long as their functions)."""
    import importlib

    codes: set[int] = set()
    for module, cls, names in (
            ("llama_index.core.instrumentation", "Dispatcher", ("event",)),
            ("llama_index.core.callbacks.base", "CallbackManager",
             ("on_event_start", "on_event_end"))):
        try:
            owner = getattr(importlib.import_module(module), cls)
        except Exception:
            continue
        for name in names:
            code = getattr(getattr(owner, name, None), "__code__", None)
            if isinstance(code, types.CodeType):
                codes.add(id(code))
    return frozenset(codes)


def _repeats_tool_errors(err: BaseException, span: str,
                         recorded: list[BaseException]) -> bool:
    """Whether `err` is LlamaIndex's `predict_and_call(error_on_tool_error=True)` failure: a
    new ValueError of the tools' outputs joined by blank lines, a failed tool's reading
    `Encountered error: <message>` — an error counted under its tool already."""
    if type(err) is not ValueError or not span.endswith("predict_and_call"):
        return False
    text = str(err)
    for e in recorded:
        # (one output among others, whole: `\n\n` around it; a raised error's output is
        # "Encountered error: <message>", an error output's its content, our error's message)
        for part in (f"Encountered error: {e}", str(e)):
            if part and (text == part or text.startswith(part + "\n\n")
                         or text.endswith("\n\n" + part) or f"\n\n{part}\n\n" in text):
                return True
    return False


def _retriever_name(span_id: str | None) -> str:
    """The class of the retriever whose `retrieve` span `span_id` is (`Class.retrieve-<uuid>`)."""
    if not span_id:
        return "unknown"
    return span_name(span_id).rpartition(".")[0] or "unknown"


def _component_classes() -> list[tuple[type, str]]:
    """LlamaIndex base classes → our span kinds (most specific first); missing ones skipped."""
    wanted = [
        ("llama_index.core.agent.workflow.base_agent", "BaseWorkflowAgent", "agent"),
        ("llama_index.core.agent.workflow.multi_agent_workflow", "AgentWorkflow", "agent"),
        ("llama_index.core.workflow", "Workflow", "workflow"),
        ("llama_index.core.base.llms.base", "BaseLLM", "llm"),
        ("llama_index.core.base.embeddings.base", "BaseEmbedding", "embedding"),
        ("llama_index.core.base.base_retriever", "BaseRetriever", "retrieve"),
        ("llama_index.core.base.base_query_engine", "BaseQueryEngine", "query"),
        ("llama_index.core.chat_engine.types", "BaseChatEngine", "chat"),
        ("llama_index.core.tools.types", "BaseTool", "tool"),
        ("llama_index.core.postprocessor.types", "BaseNodePostprocessor", "postprocess"),
        ("llama_index.core.response_synthesizers.base", "BaseSynthesizer", "synthesize"),
    ]
    import importlib

    classes: list[tuple[type, str]] = []
    for module, name, kind in wanted:
        try:
            classes.append((getattr(importlib.import_module(module), name), kind))
        except Exception as exc:
            log.debug("aim-llama: %s.%s unavailable (%s)", module, name, exc)
    return classes
