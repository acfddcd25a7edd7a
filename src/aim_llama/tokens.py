"""Token counts: what the provider reported, else an estimate with LlamaIndex's tokenizer.

Providers report usage in different places: OpenAI-style `raw["usage"]` (a dict or an SDK
object), `raw["usage_metadata"]` (Gemini / LangChain style), or the response's
`additional_kwargs` (llama-index-llms-openai copies the counts there). Estimates use
`Settings.tokenizer` (tiktoken, bundled, offline) on at most `ESTIMATE_CHARS` characters and
extrapolate beyond, so a huge text costs bounded time on the application's thread.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NamedTuple

from .render import field

log = logging.getLogger("aim_llama")

ESTIMATE_CHARS = 100_000

_PROMPT_KEYS = ("prompt_tokens", "input_tokens", "prompt_token_count", "input_token_count")
_COMPLETION_KEYS = (
    "completion_tokens",
    "output_tokens",
    "candidates_token_count",
    "output_token_count",
)
_TOTAL_KEYS = ("total_tokens", "total_token_count")


class TokenCounts(NamedTuple):
    """Prompt, completion and total tokens of one call, and where they came from."""

    prompt: int
    completion: int
    total: int
    source: str  # "provider" or "estimated"


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return field(obj, key)  # cheap on pydantic models that lack the attribute


_INT64 = 2**63


def _first_int(obj: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = _get(obj, key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT64:
            return value  # (a count outside Aim's int64 would make its sequence unstorable)
    return None


def _from_usage(usage: Any) -> TokenCounts | None:
    if usage is None:
        return None
    prompt = _first_int(usage, _PROMPT_KEYS)
    completion = _first_int(usage, _COMPLETION_KEYS)
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    completion = completion or 0
    total = _first_int(usage, _TOTAL_KEYS)
    return TokenCounts(prompt, completion, total if total is not None else prompt + completion,
                       "provider")


def provider_counts(response: Any) -> TokenCounts | None:
    """Usage reported by the provider in a Chat/CompletionResponse, or None."""
    if response is None:
        return None
    raw = _get(response, "raw")
    for key in ("usage", "usage_metadata"):
        counts = _from_usage(_get(raw, key))
        if counts is not None:
            return counts
    counts = _from_usage(_get(response, "additional_kwargs"))
    if counts is not None:
        return counts
    message = _get(response, "message")
    return _from_usage(_get(message, "additional_kwargs")) if message is not None else None


def estimate(text: str) -> int:
    """Tokens in `text` by `Settings.tokenizer`; len/4 if the tokenizer cannot be used."""
    if not text:
        return 0
    head = text[:ESTIMATE_CHARS]
    try:
        from llama_index.core import Settings

        count = len(Settings.tokenizer(head))
    except Exception as exc:
        log.debug("no tokenizer for estimates: %s", exc)
        return (len(text) + 3) // 4
    if len(text) > len(head):
        count = round(count * len(text) / len(head))
    return count


def estimated_counts(prompt: str, completion: str) -> TokenCounts:
    """Estimated counts for a call whose provider reported none."""
    p = estimate(prompt)
    c = estimate(completion)
    return TokenCounts(p, c, p + c, "estimated")


_deferrable: tuple[Any, bool] = (object(), False)  # (tokenizer checked last, answer)


def can_defer() -> bool:
    """True when LlamaIndex's default tokenizer is in use, so the writer can count instead."""
    global _deferrable
    core = sys.modules.get("llama_index.core")
    tokenizer = getattr(core, "global_tokenizer", None)
    if tokenizer is _deferrable[0]:
        return _deferrable[1]
    answer = _can_defer(tokenizer)
    _deferrable = (tokenizer, answer)
    return answer


def _can_defer(tokenizer: Any) -> bool:
    try:
        if tokenizer is None:
            return True
        # What LlamaIndex's get_tokenizer() installs: partial(cl100k.encode, allowed_special="all")
        func = getattr(tokenizer, "func", None)
        encoding = getattr(func, "__self__", None)
        return (
            getattr(func, "__name__", "") == "encode"
            and getattr(encoding, "name", "") == "cl100k_base"
            and getattr(tokenizer, "keywords", None) == {"allowed_special": "all"}
            and not getattr(tokenizer, "args", ())
        )
    except Exception:
        return False


def rough(text: str) -> int:
    """A quick approximation (4 characters a token) for trace lines on the application's thread."""
    return (len(text) + 3) // 4


_writer_encoder: Any = None


def _encoder() -> Any:
    """tiktoken's encoding that LlamaIndex's default tokenizer uses, from LlamaIndex's bundled cache."""
    global _writer_encoder
    if _writer_encoder is None:
        import importlib.util
        import os

        import tiktoken

        spec = importlib.util.find_spec("llama_index.core")
        if spec is not None and spec.origin and "TIKTOKEN_CACHE_DIR" not in os.environ:
            cache = os.path.join(os.path.dirname(spec.origin), "_static", "tiktoken_cache")
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
        _writer_encoder = tiktoken.encoding_for_model("gpt-3.5-turbo")
    return _writer_encoder


_recent_counts: dict[str, int] = {}  # the writer counts a call's prompt for two metrics
_RECENT = 64


def count_in_writer(texts: tuple[str, ...] | list[str]) -> int:
    """Estimated tokens of `texts` (summed), counted where the writer runs; len/4 on failure."""
    total = 0
    try:
        encoder = _encoder()
    except Exception as exc:
        log.debug("no tiktoken in the writer: %s", exc)
        return sum(rough(t) for t in texts)
    for text in texts:
        count = _recent_counts.get(text)
        if count is None:
            head = text[:ESTIMATE_CHARS]
            count = len(encoder.encode(head, allowed_special="all"))
            if len(text) > len(head) and head:
                count = round(count * len(text) / len(head))
            if len(_recent_counts) >= _RECENT:
                _recent_counts.clear()
            _recent_counts[text] = count
        total += count
    return total
