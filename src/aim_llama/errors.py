"""Exceptions raised by aim-llama (only in strict mode; the default path logs instead)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import re

# (compiled at the first message: this module loads at interpreter start-up, `re` need not)
_compiled: list[re.Pattern[str]] = []


def _patterns() -> list[re.Pattern[str]]:
    """[a URL's password, a quoted key with its value, a quoted NAME=VALUE, the words of a
    name, the built-in secrets]."""
    if not _compiled:
        import re

        from .content import DEFAULT_SECRET_PATTERNS, compile_patterns

        _compiled[:] = [  # (built whole, then swapped in: threads may race to it)
            # where a URL's password starts: `//user:` (`_mask_urls` finds where it ends)
            re.compile(r"//[^/@\s:'\",]{0,256}:"),
            # a quoted key, then `:` or `=` and its value (JSON, a repr, TOML); the value is
            # masked if the key's name looks secret (`secret_name`); a value cut short
            # (`"sk-…...'`) ends at a quote, space or bracket
            re.compile(
                r"""(["'])([^"'=:]{1,200})\1(\s*[:=]\s*)("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"""
                r"""|\[[^\]]{0,2000}\]?|\{[^}]{0,2000}\}?|["']?[^\s,}\]"']+)"""),
            # a quoted `NAME=VALUE` (`--set 'api_key=…'`): its value, if the name looks secret
            re.compile(r"""(["'])([A-Za-z0-9_.\- ]{1,200})=(.{0,200}?)\1(?=[:\s,)]|$)"""),
            # the words of a key name (`openai_api_key`, `githubToken`, `X-Auth-Token`)
            re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])"),
            *compile_patterns(DEFAULT_SECRET_PATTERNS),
        ]
    return _compiled


# What makes a key's name secret: one of these words (`api_key`, `X-Auth-Token`, `pw`,
# `ssh_keys`), or one of the longer parts anywhere in it, words joined or not (`authtoken`,
# `OPENAIAPIKEY`, `Authorization`, `db_password`, `connection_string`); or `token(s)` as a
# word unless the name counts them (`max_tokens`, `token_count`, `cached_tokens`), or joined
# (`hftoken`), not in `tokenizer`. Not `author`, `monkey`. Masking more is the safe side.
_SECRET_WORDS = frozenset({"key", "keys", "auth", "pwd", "pw", "pass", "sig", "dsn", "jwt",
                           "pat", "otp", "pin", "pk", "sk", "cred", "creds"})
_SECRET_PARTS = ("password", "passwd", "passphrase", "passcode", "secret", "apikey",
                 "privatekey", "privkey", "accesskey", "authkey", "appkey", "masterkey",
                 "sshkey", "signingkey", "encryptionkey", "authorization", "authtoken",
                 "accesstoken", "credential", "bearer", "cookie", "signature", "session",
                 "webhook", "connectionstring", "connstr", "databaseurl")
_COUNT_WORDS = frozenset({"count", "num", "limit", "max", "min", "total", "size"})
_COUNTED_WORDS = _COUNT_WORDS | {"prompt", "completion", "cached", "context", "reasoning",
                                 "input", "output", "used", "new", "per", "chunk"}


def secret_name(name: str) -> bool:
    """Whether a key's name says it holds a secret (`api_key`, `authtoken`, not `max_tokens`)."""
    low = "".join(c for c in name.lower() if c.isalnum())
    if any(part in low for part in _SECRET_PARTS):
        return True
    words = {w.lower() for w in _patterns()[3].findall(name)}
    if "token" in words and not words & _COUNT_WORDS:
        return True
    if "tokens" in words and not words & _COUNTED_WORDS:
        return True
    if "token" not in words and "tokens" not in words and "token" in low \
            and "tokeniz" not in low and "tokens" not in low:
        return True  # (joined: `hftoken`, `slacktoken`)
    return bool(words & _SECRET_WORDS)


def mask_url_password(text: str) -> str:
    """`text` with the password of any URL in it (`aim://user:pass@host`) as `***`: all of it
    up to the last `@` of its word (a password may hold `/`, `,`, `'` or `@`); the user, if
    any, stays. A port then a path (`host:443/@types/x`) is no password. Linear in `text`."""
    if "@" not in text or "//" not in text:
        return text
    import re

    start = _patterns()[0]
    words = re.split(r"(\s+)", text)
    for i, word in enumerate(words):
        if "@" not in word:
            continue
        at = word.rfind("@")
        found = start.search(word)
        while found is not None and found.end() <= at:
            if not re.fullmatch(r"\d{1,5}/", word[found.end():at]):  # (`:443/@types`: a path)
                word = f"{word[:found.end()]}***{word[at:]}"
                break
            found = start.search(word, found.end())
        words[i] = word
    return "".join(words)


def one_line(text: str) -> str:
    """`text` with control characters (a newline in a path …) and line separators escaped as
    `repr` does, so that a message naming it stays one line; other characters (CJK, a no-break
    space) stay as they are."""
    if not any(c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in text):
        return text
    return "".join(repr(c)[1:-1] if c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029"
                   else c for c in text)


def mask_secrets(text: str, keys: bool = True) -> str:
    """`text` with URL passwords, the built-in secret patterns and (with `keys`) the values of
    keys whose name looks secret masked as `***`: a settings message may quote a value that
    holds a credential."""
    _url, item, assignment, _words, *secrets = _patterns()
    text = mask_url_password(text)
    if keys:
        text = item.sub(lambda m: (f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}***"
                                   if secret_name(m.group(2)) else m.group(0)), text)
        text = assignment.sub(lambda m: (f"{m.group(1)}{m.group(2)}=***{m.group(1)}"
                                         if secret_name(m.group(2)) else m.group(0)), text)
    for regex in secrets:
        text = regex.sub("***", text)
    return text


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the setting, its source and what is
    allowed, with any secret it quotes masked (`mask_secrets`) and control characters escaped."""

    def __init__(self, message: str, *, setting: str | None = None, source: str | None = None):
        # (`redact`'s values are the user's own patterns, not values under a key: a pattern
        # like `"password": "[^"]*"` stays readable; secrets in it are still masked)
        keys = setting != "redact"
        super().__init__(one_line(mask_secrets(message, keys)))
        self.setting = setting
        self.source = None if source is None else one_line(mask_secrets(source, keys))
