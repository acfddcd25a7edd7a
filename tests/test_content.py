"""The content policy's redaction and the token counts, where no pipeline is needed to see
them: every kind of secret the README lists, where a secret may start, and how estimates and
provider counts are taken (one end-to-end check of a custom tokenizer, read back from Aim)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aim_llama.content import ContentPolicy

KEY = "sk-" + "a1B2" * 8


# -- redact_secrets: every built-in kind the README lists ----------------------------------
@pytest.mark.parametrize("secret", [
    "xoxb-" + "1234567890-abcdefghijKLMN",           # Slack
    "AIza" + "SyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW",  # Google (35 after AIza)
    "ASIA" + "QWERTYUIOPASDFGH",                     # AWS temporary access key id
], ids=["slack", "google", "aws-asia"])
def test_every_listed_kind_of_secret_is_redacted_on_its_own(secret: str) -> None:
    text = f"config: {secret} end"  # (no other secret beside it to wake the regex up)
    assert ContentPolicy().redact(text) == "config: [REDACTED] end"


def test_a_secret_right_after_an_escape_is_redacted_but_not_after_an_underscore() -> None:
    """README: recognised right after an escape ending in a letter or digit (`\\n` inside
    JSON or a repr, `%3D`); after an underscore it is not (`lookup_sk-…` stays)."""
    policy = ContentPolicy()
    assert policy.redact('{"log": "line one\\n' + KEY + '"}') == '{"log": "line one\\n[REDACTED]"}'
    assert policy.redact("https://x/?key%3D" + KEY) == "https://x/?key%3D[REDACTED]"
    assert policy.redact("lookup_" + KEY) == "lookup_" + KEY


# -- token estimates -------------------------------------------------------------------------
def test_token_estimates_extrapolate_beyond_the_characters_tokenized() -> None:
    """README: estimates tokenize at most 100,000 characters per text and extrapolate beyond,
    on the application's thread and in the writer alike."""
    from llama_index.core import Settings

    from aim_llama.tokens import count_in_writer, estimate

    text = "alpha beta gamma delta " * 10_000  # 230,000 characters
    head = len(Settings.tokenizer(text[:100_000]))
    expected = round(head * len(text) / 100_000)
    assert estimate(text) == expected
    assert count_in_writer(["  " + text[2:]]) == pytest.approx(expected, rel=0.01)


def test_a_batch_estimate_extrapolates_beyond_the_texts_tokenized() -> None:
    """The same for many texts at once (an embedding batch, counted on the app thread with a
    custom tokenizer): about 100,000 characters of them are tokenized, the rest extrapolated."""
    from aim_llama.observer import _estimate_many

    text = "word " * 20_000  # 100,000 characters
    one = _estimate_many([text])
    assert one > 0
    assert abs(_estimate_many([text, text, text]) - 3 * one) <= 3


def test_provider_counts_outside_the_int64_range_are_not_taken() -> None:
    """README: token counts outside 0…2⁶³ are not taken from the provider (estimated)."""
    from types import SimpleNamespace

    from aim_llama.tokens import provider_counts

    negative = SimpleNamespace(raw={"usage": {"prompt_tokens": -5, "completion_tokens": -1}})
    assert provider_counts(negative) is None
    huge = SimpleNamespace(raw={"usage": {"prompt_tokens": 2**63, "completion_tokens": 2**64}})
    assert provider_counts(huge) is None


def test_provider_usage_in_input_output_keys_and_without_a_total() -> None:
    """(minor) Anthropic-style `input_tokens` / `output_tokens`; a missing total is the sum."""
    from types import SimpleNamespace

    from aim_llama.tokens import TokenCounts, provider_counts

    response = SimpleNamespace(raw={"usage": {"input_tokens": 11, "output_tokens": 4}})
    assert provider_counts(response) == TokenCounts(11, 4, 15, "provider")


def test_a_custom_tokenizer_counts_the_estimated_tokens(tmp_path: Path) -> None:
    """README: estimates use `Settings.tokenizer`; the writer counts only for LlamaIndex's
    default tokenizer, a custom one counts on the application's thread."""
    import llama_index.core as core
    from llama_index.core import Settings
    from llama_index.core.llms import MockLLM

    import aim_llama
    from aimread import read_run

    saved = core.global_tokenizer
    Settings.tokenizer = lambda text: list(text)  # one token a character
    repo = tmp_path / "repo"
    try:
        assert aim_llama.instrument(repo=str(repo), writer="thread", system_tracking_interval=None,
                                    log_system_params=False, capture_terminal_logs=False)
        from aim_llama.autoinstrument import _active

        writer = _active.writer if _active is not None else None
        MockLLM(max_tokens=3).complete("hello tokenizer world")  # (tiktoken: 3)
    finally:
        aim_llama.uninstrument()
        core.global_tokenizer = saved
    assert writer is not None and writer.run_hash
    run = read_run(repo, writer.run_hash)
    assert run.metric("prompt_tokens", kind="llm", source="estimated") == [(0, 21)]
