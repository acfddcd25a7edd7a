"""Content controls for every captured text: capture on/off, redaction, truncation, sampling.

One `ContentPolicy` is built from the settings. It works in two halves, so that the
application's thread does only what is cheap:

* on the application's thread, `text()` decides whether a text is recorded at all (capture
  on/off; `sample()` decides per request) and `clip()` cuts a huge text to the maximum length
  plus a small margin (so a secret straddling the cut is still recognised later);
* in the writer (the writer process by default), `finish()` redacts and truncates it, before
  anything reaches Aim's storage or an Aim server.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .records import Clipped

REDACTED = "[REDACTED]"
NOT_CAPTURED = "[content not captured]"

# Common secrets, redacted by default (`redact_secrets = false` turns these off).
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    r"\bsk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_\-]{16,}",  # OpenAI / Anthropic-style keys
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\b(?i:bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*",  # HTTP bearer tokens
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"\bAIza[0-9A-Za-z\-_]{35}\b",  # Google API keys
)

MARGIN = 256  # kept beyond a cut, so a secret straddling it is still recognised

# Lower-case literals, one of which every default secret pattern contains. Checking for them
# (a few memchr-speed scans) lets almost every text skip the regex: ~12x cheaper per text.
DEFAULT_SECRET_ANCHORS: tuple[str, ...] = (
    "-----begin", "sk-", "akia", "asia", "bearer", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "xox", "aiza",
)


_GLOBAL_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")


def _scoped(pattern: str) -> str:
    """`(?i)abc` → `(?i:abc)`: global flags are only allowed at the start of a whole regex."""
    match = _GLOBAL_FLAGS.match(pattern)
    if match:
        return f"(?{match.group(1)}:{pattern[match.end():]})"
    return f"(?:{pattern})"


def compile_patterns(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One alternation of all patterns (one pass over the text), or None when there are none."""
    parts = [_scoped(p) for p in patterns]
    return re.compile("|".join(parts)) if parts else None


def patterns_from(settings: Any) -> tuple[str, ...]:
    """The redaction patterns the settings ask for: the default secrets, then `redact`."""
    patterns: list[str] = []
    if getattr(settings, "redact_secrets", True):
        patterns.extend(DEFAULT_SECRET_PATTERNS)
    patterns.extend(getattr(settings, "redact", None) or [])
    return tuple(patterns)


@dataclass(frozen=True)
class ContentPolicy:
    """What to do with captured text: keep or drop it, redact, truncate; and which requests to sample."""

    capture: bool = True
    max_length: int | None = 20_000
    patterns: tuple[str, ...] = DEFAULT_SECRET_PATTERNS
    sample_rate: float = 1.0
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _anchors: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_patterns(self.patterns))
        # Only the built-in patterns have known anchors; user patterns always run.
        if set(self.patterns) <= set(DEFAULT_SECRET_PATTERNS):
            object.__setattr__(self, "_anchors", DEFAULT_SECRET_ANCHORS)

    @classmethod
    def from_settings(cls, settings: Any) -> ContentPolicy:
        """Build the policy from `AimLlamaSettings` (missing fields fall back to the defaults)."""
        return cls(
            capture=bool(getattr(settings, "capture_content", True)),
            max_length=getattr(settings, "max_text_length", 20_000),
            patterns=patterns_from(settings),
            sample_rate=float(getattr(settings, "sample_rate", 1.0)),
        )

    def redact(self, text: str, length: int | None = None) -> str:
        """Text with every secret replaced by `[REDACTED]` and cut to the maximum length.

        `length` is the length of the whole text when `text` is only its head (`Clipped`).
        """
        limit = self.max_length
        original = len(text) if length is None else length
        if limit is not None and original > limit:
            text = text[: limit + MARGIN]
        if self._regex is not None and self._may_hold_secret(text):
            text = self._regex.sub(REDACTED, text)
        if limit is not None and original > limit:
            text = text[:limit] + f"… [truncated {original - limit} chars]"
        return text

    def _may_hold_secret(self, text: str) -> bool:
        anchors = self._anchors
        if anchors is None:
            return True
        low = text.lower()
        return any(anchor in low for anchor in anchors)

    def text(self, value: Any) -> str | Clipped | None:
        """A captured text to record (redacted later, by `finish`), or None when capture is off."""
        if not self.capture:
            return None
        return self.clip(value if isinstance(value, str) else str(value))

    def clip(self, text: str) -> str | Clipped:
        """`text`, or its head (maximum length + margin) with its length when it is longer."""
        limit = self.max_length
        if limit is not None and len(text) > limit + MARGIN:
            return Clipped(text[: limit + MARGIN], len(text))
        return text

    def finish(self, value: str | Clipped) -> str:
        """The stored form of a captured text: secrets redacted, cut to the maximum length."""
        if isinstance(value, Clipped):
            return self.redact(value.text, value.length)
        return self.redact(value)

    def sample(self) -> bool:
        """Decide once, for a new root request, whether its texts are recorded."""
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)
