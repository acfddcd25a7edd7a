"""Registration of aim-llama on LlamaIndex's root instrumentation dispatcher.

Two thin adapters — a `BaseSpanHandler` and a `BaseEventHandler` — forward to one `Observer`.
`install()` is idempotent (any earlier aim-llama adapters are removed first, so exactly one of
each is registered however often activation runs); `uninstall()` removes them and writes the
traces of requests still open.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler

from .content import ContentPolicy
from .observer import Observer
from .records import Record


def _bind(handler: Any, observer: Observer) -> None:
    """Keep the observer in the instance `__dict__`: reading a pydantic private attribute goes
    through `BaseModel.__getattr__` (~3 us), an instance attribute costs ~0.1 us, and this is
    read on every span and event."""
    handler.__dict__["obs"] = observer


class AimSpanHandler(BaseSpanHandler[Any]):
    """Forwards span enter / exit / drop to the observer; keeps no spans of its own."""

    obs: ClassVar[Observer]  # set per instance by `_bind`

    def __init__(self, observer: Observer) -> None:
        super().__init__(open_spans={}, completed_spans=[], dropped_spans=[], current_span_ids={})
        _bind(self, observer)

    @classmethod
    def class_name(cls) -> str:
        """Name shown by LlamaIndex."""
        return "AimLlamaSpanHandler"

    def span_enter(self, id_: str, bound_args: Any, instance: Any | None = None,
                   parent_id: str | None = None, tags: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
        """A span started."""
        try:
            self.obs.span_enter(id_, bound_args, instance, parent_id)
        except Exception as exc:
            self.obs.failed("span start", exc)

    def span_exit(self, id_: str, bound_args: Any, instance: Any | None = None,
                  result: Any | None = None, **kwargs: Any) -> None:
        """A span returned."""
        try:
            self.obs.span_exit(id_, bound_args, result)
        except Exception as exc:
            self.obs.failed("span end", exc)

    def span_drop(self, id_: str, bound_args: Any, instance: Any | None = None,
                  err: BaseException | None = None, **kwargs: Any) -> None:
        """A span raised."""
        try:
            self.obs.span_drop(id_, bound_args, err)
        except Exception as exc:
            self.obs.failed("span error", exc)

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

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        _bind(self, observer)

    @classmethod
    def class_name(cls) -> str:
        """Name shown by LlamaIndex."""
        return "AimLlamaEventHandler"

    def handle(self, event: Any, **kwargs: Any) -> None:
        """One event."""
        try:
            self.obs.handle(event)
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
    """A forked child records into its own run: fresh lock and LLM step numbers."""
    import itertools
    import threading

    for handler in get_dispatcher().span_handlers:
        if isinstance(handler, AimSpanHandler):
            observer = handler.obs
            observer._lock = threading.RLock()
            observer._llm_steps = itertools.count()
            observer._models = {}
            observer._seen_models = set()


if hasattr(__import__("os"), "register_at_fork"):
    __import__("os").register_at_fork(after_in_child=_after_fork_in_child)
