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

from .records import ERROR_LENGTH, Clipped

REDACTED = "[REDACTED]"
NOT_CAPTURED = "[content not captured]"

# Common secrets, redacted by default (`redact_secrets = false` turns these off).
# Where a secret may start: not right after an ASCII letter, digit or underscore (after any
# other character — CJK text, an accented letter — it may: redacting more is the safe side),
# and right after an escape that ends in a letter or digit as well (`\n` in JSON or a repr,
# `\u5bc6`, `%3D`, an ANSI colour's `\x1b[31m`), where `\b` saw a word going on.
_START = (r"(?:(?<![A-Za-z0-9_])|(?<=\\[nrtbfv])|(?<=\\u[0-9A-Fa-f]{4})|(?<=\\x[0-9A-Fa-f]{2})"
          r"|(?<=%[0-9A-Fa-f]{2})|(?<=\[[0-9;]m)|(?<=[0-9]m))")
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    # (each starts with its literal as a lookahead: the lookbehinds then run only there)
    r"(?=sk-)" + _START + r"sk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_\-]{16,}",  # OpenAI-style
    r"(?=A[KS]IA)" + _START + r"(?:AKIA|ASIA)[0-9A-Z]{16}(?!\w)",  # AWS access key ids
    r"(?=[Bb])" + _START + r"(?i:bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*",  # HTTP bearer tokens
    r"(?=gh)" + _START + r"gh[pousr]_[A-Za-z0-9]{30,}(?!\w)",  # GitHub tokens
    r"(?=xox)" + _START + r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"(?=AIza)" + _START + r"AIza[0-9A-Za-z\-_]{35}(?![\w\-])",  # Google API keys
)

MARGIN = 256  # kept beyond a cut, so a secret straddling it is still recognised


class _Default:
    """The type of `DEFAULT`: "use the policy's maximum text length"."""


DEFAULT = _Default()

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


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    """The regexes that redaction runs: the built-in secret patterns as one alternation (one
    pass over the text), and every other pattern compiled on its own, so that its group names
    and numbered backreferences mean what they meant when it was written."""
    patterns = list(patterns)
    builtin = [p for p in patterns if p in DEFAULT_SECRET_PATTERNS]
    regexes = [re.compile("|".join(_scoped(p) for p in builtin))] if builtin else []
    regexes.extend(re.compile(p) for p in patterns if p not in DEFAULT_SECRET_PATTERNS)
    return regexes


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
    _regexes: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _anchored: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regexes", tuple(compile_patterns(self.patterns)))
        # The first regex is the built-in secrets' alternation when any of them is asked for:
        # only that one has known anchors; user patterns always run.
        object.__setattr__(self, "_anchored",
                           any(p in DEFAULT_SECRET_PATTERNS for p in self.patterns))

    @classmethod
    def from_settings(cls, settings: Any) -> ContentPolicy:
        """Build the policy from `AimLlamaSettings` (missing fields fall back to the defaults)."""
        return cls(
            capture=bool(getattr(settings, "capture_content", True)),
            max_length=getattr(settings, "max_text_length", 20_000),
            patterns=patterns_from(settings),
            sample_rate=float(getattr(settings, "sample_rate", 1.0)),
        )

    def redact(self, text: str, length: int | None = None, limit: int | _Default | None = DEFAULT
               ) -> str:
        """Text with every secret replaced by `[REDACTED]` and cut to `limit` characters
        (the maximum text length unless given), with a note of how much was cut.

        `length` is the length of the whole text when `text` is only its head (`Clipped`).
        The cut is counted in the original text, so a secret redacted before it never pulls
        text from beyond it into view.
        """
        if isinstance(limit, _Default):
            limit = self.max_length
        original = len(text) if length is None else length
        if limit is None or original <= limit:
            return self.redact_head(text, None)
        return self.redact_head(text[: limit + MARGIN], limit) + (
            f"… [truncated {original - limit} chars]")

    def redact_head(self, text: str, limit: int | None) -> str:
        """`text` with its secrets replaced, keeping only what stood in its first `limit`
        characters (all of it for None). A secret that starts before the cut is replaced
        whole; `text` should reach `MARGIN` characters beyond the cut for that to hold."""
        stop = len(text) if limit is None else min(limit, len(text))
        spans = self._secrets(text)
        if not spans:
            return text if stop == len(text) else text[:stop]
        out: list[str] = []
        pos = 0
        for start, end in spans:
            if start >= stop:
                break
            if start < pos:  # overlaps the secret before it
                pos = max(pos, end)
                continue
            out.append(text[pos:start])
            out.append(REDACTED)
            pos = end
        if pos < stop:
            out.append(text[pos:stop])
        return "".join(out)

    def _secrets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every secret in `text`, in order (empty matches ignored)."""
        spans: list[tuple[int, int]] = []
        for i, regex in enumerate(self._regexes):
            if i == 0 and self._anchored and not self._may_hold_secret(text):
                continue
            spans.extend(m.span() for m in regex.finditer(text) if m.end() > m.start())
        if len(self._regexes) > 1:
            spans.sort()
        return spans

    def redact_value(self, value: Any) -> Any:
        """`value` with secrets redacted in every string it holds (dicts — keys too —, lists,
        tuples), for run parameters: nothing is cut."""
        if isinstance(value, str):
            return self.redact_head(value, None)
        if isinstance(value, dict):  # (names too: a key may be a secret)
            out: dict[Any, Any] = {}
            for k, v in value.items():
                out[unique_name(self.redact_head(k, None), out) if isinstance(k, str) else k] = (
                    self.redact_value(v))
            return out
        if isinstance(value, list):
            return [self.redact_value(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.redact_value(v) for v in value)
        return value

    @staticmethod
    def _may_hold_secret(text: str) -> bool:
        """False when no built-in secret can be in `text` (a few memchr-speed scans for the
        literals every built-in pattern contains: ~12x cheaper than the regex)."""
        low = text.lower()
        return any(anchor in low for anchor in DEFAULT_SECRET_ANCHORS)

    def text(self, value: Any) -> str | Clipped | None:
        """A captured text to record (redacted later, by `finish`), or None when capture is off."""
        if not self.capture:
            return None
        return self.clip(value if isinstance(value, str) else str(value))

    def clip(self, text: str) -> str | Clipped:
        """`text`, or its head (maximum length + margin) with its length when it is longer."""
        return clip_to(text, self.max_length)

    def finish(self, value: str | Clipped) -> str:
        """The stored form of a captured text: secrets redacted, cut to the maximum length."""
        if isinstance(value, Clipped):
            return self.redact(value.text, value.length)
        return self.redact(value)

    def sample(self) -> bool:
        """Decide once, for a new root request, whether its texts are recorded."""
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)


def unique_name(name: str, taken: Any) -> str:
    """`name`, or — when it is taken already (two secrets redacted to one name) — `name 2`,
    `name 3` …: no value overwrites another."""
    if name not in taken:
        return name
    n = 2
    while f"{name} {n}" in taken:
        n += 1
    return f"{name} {n}"


def pausing(exc: BaseException) -> bool:
    """A workflow step pausing for an event (`ctx.wait_for_event`, human input): it runs again
    when the event comes; not an error."""
    return type(exc).__name__ == "WaitingForEvent"


def error_message(err: BaseException) -> str | Clipped:
    """An exception's message for a Logs-tab entry (`LogError.error`): whole, or its head with
    a margin when it is longer than the writer keeps (the writer redacts, then cuts)."""
    try:
        message = str(err)
    except Exception:
        message = f"<{type(err).__name__} whose message cannot be shown>"
    return clip_to(message, ERROR_LENGTH)


def clip_to(text: str, limit: int | None) -> str | Clipped:
    """`text`, or — when it is longer than `limit` + `MARGIN` — its head of that size with
    its length: what the application hands over of a text the writer cuts at `limit`."""
    if type(text) is not str:  # the application's str subclass: the writer lacks its class
        text = str.__str__(text)
    if limit is not None and len(text) > limit + MARGIN:
        return Clipped(text[: limit + MARGIN], len(text))
    return text
