"""The `aim_llama` logger, which always reaches stderr, and report-once helpers.

Applications often configure no logging at all; Python would then print our warnings through
its bare "last resort" handler, or drop INFO. We attach a fallback handler that writes one
prefixed line to stderr only while nobody else (root or our logger) has a handler, so the
message is never lost and never printed twice.
"""

from __future__ import annotations

import logging
import sys
import threading

logger = logging.getLogger("aim_llama")

_reported: set[str] = set()
_reported_lock = threading.Lock()


class _FallbackStderrHandler(logging.Handler):
    """Writes `aim_llama: message` to stderr when the application configured no handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or len(logger.handlers) > 1 or not logger.propagate:
            return
        try:
            stream = sys.stderr
            if stream is None:
                return
            level = "" if record.levelno < logging.ERROR else "error: "
            stream.write(f"aim_llama: {level}{record.getMessage()}\n")
            stream.flush()
        except Exception:  # pragma: no cover - stderr closed or broken
            pass


_fallback = _FallbackStderrHandler(logging.WARNING)
logger.addHandler(_fallback)


def warn_once(key: str, message: str, *args: object, level: int = logging.WARNING) -> bool:
    """Log `message` the first time `key` is seen in this process; return whether it was logged."""
    with _reported_lock:
        if key in _reported:
            return False
        _reported.add(key)
    logger.log(level, message, *args)
    return True


def reset_reported() -> None:
    """Forget what was reported (after fork, and for tests)."""
    with _reported_lock:
        _reported.clear()
