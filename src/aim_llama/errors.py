"""Exceptions raised by aim-llama (only in strict mode; the default path logs instead)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import re

# (compiled at the first message: this module loads at interpreter start-up, `re` need not)
_compiled: list[re.Pattern[str]] = []


def _patterns() -> list[re.Pattern[str]]:
    """[a URL's password, a secret-looking quoted key with its value, the built-in secrets]."""
    if not _compiled:
        import re

        from .content import DEFAULT_SECRET_PATTERNS, compile_patterns

        _compiled[:] = [  # (built whole, then swapped in: threads may race to it)
            # `aim://user:pass@host`: the user stays, the password goes
            re.compile(r"//([^/@\s:'\"]+):([^/@\s'\"]+)@"),
            # a quoted key whose name looks secret, then `:` or `=` and its value (JSON, a
            # repr, TOML); a value cut short (`"sk-…...'`) ends at a quote, space or bracket
            re.compile(
                r"""(["'])([^"'\s]*?(?:secret|key|token|password|passwd|credential|auth)"""
                r"""[^"'\s]*)\1(\s*[:=]\s*)("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|["']?[^\s,}\]"']+)""",
                re.IGNORECASE),
            *compile_patterns(DEFAULT_SECRET_PATTERNS),
        ]
    return _compiled


def mask_url_password(text: str) -> str:
    """`text` with the password of any URL in it (`aim://user:pass@host`) as `***`."""
    return _patterns()[0].sub(r"//\1:***@", text)


def one_line(text: str) -> str:
    """`text` with control characters (a newline in a path …) escaped as `repr` does, so that
    a message naming it stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def mask_secrets(text: str) -> str:
    """`text` with URL passwords, the built-in secret patterns and the values of secret-looking
    keys masked as `***`: a settings message may quote a value that holds a credential."""
    url, item, *secrets = _patterns()
    text = url.sub(r"//\1:***@", text)
    text = item.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}***", text)
    for regex in secrets:
        text = regex.sub("***", text)
    return text


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the setting, its source and what is
    allowed, with any secret it quotes masked (`mask_secrets`) and control characters escaped."""

    def __init__(self, message: str, *, setting: str | None = None, source: str | None = None):
        super().__init__(one_line(mask_secrets(message)))
        self.setting = setting
        self.source = None if source is None else one_line(mask_secrets(source))
