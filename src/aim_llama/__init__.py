"""aim-llama: record what every LlamaIndex application does into the Aim experiment tracker.

`import aim_llama.auto` (or `aim-llama run -- python app.py`) is all an application needs.
The programmatic API is imported lazily so that importing this package costs almost nothing.
"""

from __future__ import annotations

from .errors import ConfigError

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds at start-up

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "__version__",
    "current_run_hash",
    "flush",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from .autoinstrument import current_run_hash, flush, instrument, is_instrumented, uninstrument

_LAZY = {"instrument", "uninstrument", "is_instrumented", "flush", "current_run_hash"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import autoinstrument

        return getattr(autoinstrument, name)
    raise AttributeError(f"module 'aim_llama' has no attribute {name!r}")
