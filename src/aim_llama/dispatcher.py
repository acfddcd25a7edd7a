"""Registration of aim-llama on LlamaIndex's root instrumentation dispatcher.

Two thin adapters — a `BaseSpanHandler` and a `BaseEventHandler` — forward to one `Observer`.
`install()` is idempotent (any earlier aim-llama adapters are removed first, so exactly one of
each is registered however often activation runs); `uninstall()` removes them and writes the
traces of requests still open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler

from . import importhook
from .content import ContentPolicy
from .observer import Observer
from .records import Record

_now = time.perf_counter


def _bind(handler: Any, observer: Observer) -> None:
    """Keep the observer in the instance `__dict__`: reading a pydantic private attribute goes
    through `BaseModel.__getattr__` (~3 us), an instance attribute costs ~0.1 us, and this is
    read on every span and event."""
    handler.__dict__["obs"] = observer


class AimSpanHandler(BaseSpanHandler[Any]):
    """Forwards span enter / exit / drop to the observer; keeps no spans of its own.

    LlamaIndex calls these ~28 times per RAG query, so each instance holds the observer's own
    bound methods as `span_enter` / `span_exit` / `span_drop` (instance attributes win over
    the methods below): one Python frame per call instead of two. The observer's methods
    take LlamaIndex's keyword arguments and never raise.
    """

    obs: ClassVar[Observer]  # set per instance by `_bind`

    def __init__(self, observer: Observer) -> None:
        super().__init__(open_spans={}, completed_spans=[], dropped_spans=[], current_span_ids={})
        _bind(self, observer)
        self.__dict__["span_enter"] = observer.span_enter
        self.__dict__["span_exit"] = observer.span_exit
        self.__dict__["span_drop"] = observer.span_drop

    @classmethod
    def class_name(cls) -> str:
        """Name shown by LlamaIndex."""
        return "AimLlamaSpanHandler"

    def span_enter(self, id_: str, bound_args: Any, instance: Any | None = None,
                   parent_id: str | None = None, tags: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
        """A span started (see the class docstring: normally the observer's method is called)."""
        self.obs.span_enter(id_, bound_args, instance, parent_id)

    def span_exit(self, id_: str, bound_args: Any, instance: Any | None = None,
                  result: Any | None = None, **kwargs: Any) -> None:
        """A span returned."""
        self.obs.span_exit(id_, bound_args, instance, result)

    def span_drop(self, id_: str, bound_args: Any, instance: Any | None = None,
                  err: BaseException | None = None, **kwargs: Any) -> None:
        """A span raised."""
        self.obs.span_drop(id_, bound_args, instance, err)

    def new_span(self, id_: str, bound_args: Any, instance: Any | None = None,
                 parent_span_id: str | None = None, tags: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        """Unused: `span_enter` is overridden."""
        return None

    def prepare_to_exit_span(self, id_: str, bound_args: Any, instance: Any | None = None,
                             result: Any | None = None, **kwargs: Any) -> None:
        """Unused: `span_exit` is overridden."""
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: Any, instance: Any | None = None,
                             err: BaseException | None = None, **kwargs: Any) -> None:
        """Unused: `span_drop` is overridden."""
        return None


class AimEventHandler(BaseEventHandler):
    """Forwards instrumentation events to the observer."""

    obs: ClassVar[Observer]  # set per instance by `_bind`
    routes: ClassVar[dict[str, Callable[[Any, float], None]]]  # the observer's, by event class

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        _bind(self, observer)
        self.__dict__["routes"] = observer.routes

    @classmethod
    def class_name(cls) -> str:
        """Name shown by LlamaIndex."""
        return "AimLlamaEventHandler"

    def handle(self, event: Any, **kwargs: Any) -> None:
        """One event: routed by class name here (most events of a query are not ours to
        record, and this is the cheapest way to say so)."""
        method = self.routes.get(type(event).__name__)
        if method is not None:
            try:
                method(event, _now())
            except Exception as exc:
                self.obs.failed(type(event).__name__, exc)


def install(owner: Any, settings: Any) -> Observer:
    """Register one span handler and one event handler on the root dispatcher.

    Records go through `owner.submit_many` (the callback handler's writer hook, which the fork
    hook re-points), so both channels always feed the same writer.
    """
    uninstall()
    ignored = set(getattr(settings, "event_starts_to_ignore", None) or [])
    ignored |= set(getattr(settings, "event_ends_to_ignore", None) or [])

    def submit_many(records: list[Record]) -> None:
        owner.submit_many(records)

    observer = Observer(submit_many, ContentPolicy.from_settings(settings), frozenset(ignored))
    root = get_dispatcher()
    root.add_span_handler(AimSpanHandler(observer))
    root.add_event_handler(AimEventHandler(observer))
    return observer


def uninstall() -> None:
    """Remove every aim-llama adapter from the root dispatcher; write open requests' traces."""
    root = get_dispatcher()
    ours = [h for h in root.span_handlers if isinstance(h, AimSpanHandler)]
    root.span_handlers = [h for h in root.span_handlers if not isinstance(h, AimSpanHandler)]
    root.event_handlers = [h for h in root.event_handlers if not isinstance(h, AimEventHandler)]
    for handler in ours:
        try:
            handler.obs.close()
        except Exception as exc:
            handler.obs.failed("shutdown", exc)


def _after_fork_in_child() -> None:
    """A forked child records into its own run: fresh lock and LLM step numbers, and none of
    the parent's open requests (their spans end in the parent; the child must neither write
    them into its own run nor attach its own work to them)."""
    import collections
    import itertools
    import threading

    for handler in get_dispatcher().span_handlers:
        if isinstance(handler, AimSpanHandler):
            observer = handler.obs
            observer._lock = threading.RLock()
            observer._llm_steps = itertools.count()
            observer._request_steps = {}
            observer._component_steps = {}
            observer._models = {}
            observer._seen_models = set()
            observer._spans = {}
            observer._roots = {}
            observer._calls = {}
            observer._timed = {}
            observer._tool_errors = {}
            observer._postprocessing = {}
            observer._dropped = collections.deque()


if hasattr(__import__("os"), "register_at_fork"):
    __import__("os").register_at_fork(after_in_child=_after_fork_in_child)


# Imported by the application before LlamaIndex: activation waited for this module (auto.py).
importhook.module_done(__name__)
