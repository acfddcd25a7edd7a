"""The on/off settings needed before, or without, full validation: `enabled`, `strict`, `propagate`.

The kill switch must win over a broken configuration, strict mode must be known when the
configuration cannot be validated, and the launcher and start-up hook must read them without
importing pydantic. So each is looked up raw, in the usual precedence (keyword arguments >
environment > the TOML file > `[tool.aim_llama]` in pyproject.toml), and parsed on its own.
A file is parsed only when its text mentions the key, so a process whose directory holds a
pyproject.toml that never mentions aim-llama pays one small read, not a TOML parse.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping
    from typing import Any

CONFIG_ENV = "AIM_LLAMA_CONFIG"
# The text of a config that was a pipe (`AIM_LLAMA_CONFIG=<(...)`), for the processes started
# after it was read: the launcher's command and the program's own Python children, which would
# otherwise find the pipe empty (or closed) and run with the defaults.
CONFIG_TEXT_ENV = "AIM_LLAMA_CONFIG_TEXT"
# Set by `aim-llama run` for its command: `VAR=--option@digest;…`, the variables its options
# set (and a digest of the value set), so that messages name the option the user typed rather
# than a variable they never set — unless a program in between changed the variable.
COMMAND_LINE_ENV = "AIM_LLAMA_FROM_COMMAND_LINE"
DEFAULT_TOML = "aim_llama.toml"
PYPROJECT = "pyproject.toml"
ENV = {"enabled": "AIM_LLAMA_ENABLED", "strict": "AIM_LLAMA_STRICT",
       "propagate": "AIM_LLAMA_PROPAGATE"}
TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE = frozenset({"0", "false", "no", "off", "n", "f"})


def value_digest(value: str) -> str:
    """A short digest of an environment value (`COMMAND_LINE_ENV` says which value an option
    set without repeating it: it may be a path or a secret-bearing URL)."""
    import zlib

    return format(zlib.crc32(value.encode("utf-8", "surrogateescape")), "08x")


def parse_bool(value: Any) -> bool | None:
    """True / False for the words and values every boolean setting accepts; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    return None


def switch(name: str, environ: Mapping[str, str] | None = None,
           overrides: Mapping[str, Any] | None = None, *, quick: bool = False) -> bool | None:
    """The value of boolean setting `name` from the highest source that sets it.

    None when no source sets it, or when that source's value is not a boolean (full
    validation reports it); a file that cannot be read or parsed is skipped the same way.
    `quick` (interpreter start-up): a file is parsed only if a line `name = ...` stands in
    aim-llama's table, so TOML's parser (and `re`) load only for users who set it there; the
    rarer spellings (dotted keys, inline tables) are then found at activation instead.
    """
    if overrides is not None and name in overrides:
        return parse_bool(overrides[name])
    return switch_source(name, environ, quick=quick)[0]


def switch_source(name: str, environ: Mapping[str, str] | None = None, *,
                  quick: bool = False) -> tuple[bool | None, str]:
    """`switch` (without overrides), and the source that set it (`env VAR`, `FILE: key`,
    or `default`), e.g. for `aim-llama doctor` to say where the kill switch is."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV[name], "")
    if raw.strip():
        return parse_bool(raw), f"env {ENV[name]}"
    for path, table, named in _files(env):
        found, value = _peek(path, table, name, quick, named)
        if found:
            where = f" [{'.'.join(table)}]" if table else ""
            return parse_bool(value), f"{path}{where}: {name}"
    return None, "default"


# The directory `import aim_llama.auto` ran in, while the activation it deferred to
# LlamaIndex's import runs (`pinned_directory`): a program that changes directory in between
# gets the settings files, and the strict switch, of one directory.
_pinned: str | None = None


class pinned_directory:
    """Within the block, relative settings paths (the default files, a relative
    `AIM_LLAMA_CONFIG` or `AIM_REPO`) are read in `path`, not the working directory.
    None changes nothing (the directory was deleted before it could be noted)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.before: str | None = None

    def __enter__(self) -> None:
        global _pinned
        self.before = _pinned
        if self.path is not None:
            _pinned = self.path

    def __exit__(self, *exc: object) -> None:
        global _pinned
        _pinned = self.before


def here() -> str | None:
    """The directory relative settings paths are read in (see `pinned_directory`); None where
    the working directory was deleted."""
    if _pinned is not None:
        return _pinned
    try:
        return os.getcwd()
    except OSError:
        return None


def settings_files(environ: Mapping[str, str]) -> tuple[str | None, bool, str | None]:
    """Where settings files are looked for: (the TOML file, whether `AIM_LLAMA_CONFIG` named
    it, pyproject.toml); None where the working directory was deleted (no files "here").
    An unknown `~user` in `AIM_LLAMA_CONFIG` raises RuntimeError, as `Path.expanduser` does."""
    explicit = environ.get(CONFIG_ENV, "").strip()
    cwd = here()
    pyproject = None if cwd is None else os.path.join(cwd, PYPROJECT)
    if explicit:
        path = os.path.expanduser(explicit)
        if path.startswith("~"):
            raise RuntimeError("Could not determine home directory.")
        if _pinned is not None:
            path = os.path.join(_pinned, path)  # (an absolute path stays as it is)
        return path, True, pyproject
    return (None if cwd is None else os.path.join(cwd, DEFAULT_TOML)), False, pyproject


def _files(environ: Mapping[str, str]) -> list[tuple[str, tuple[str, ...], bool]]:
    """The TOML files to look in, highest precedence first, with the table holding our keys
    and whether `AIM_LLAMA_CONFIG` named the file (only such a one may be a pipe)."""
    try:
        toml, explicit, pyproject = settings_files(environ)
    except RuntimeError:  # unknown ~user: only pyproject.toml can be read (the error comes later)
        toml, explicit, pyproject = None, True, settings_files({})[2]
    files: list[tuple[str, tuple[str, ...], bool]] = []
    if toml is not None:
        files.append((toml, (), explicit))
    if pyproject is not None:
        files.append((pyproject, ("tool", "aim_llama"), False))
    return files


MAX_CONFIG_BYTES = 4_000_000
MAX_PIPE_BYTES = 32_768  # a pipe's text travels on in the environment (one variable's limit: 128 KiB)
PIPE_WAIT = 2.0  # seconds a config file that is a pipe may take to deliver its text
# Config "files" that can be read only once (`AIM_LLAMA_CONFIG=<(...)`, a FIFO): their text,
# so that the switches and full validation see the same settings.
_once: dict[str, bytes | OSError] = {}
_identity: dict[str, str] = {}  # "dev:ino:" of each pipe read here (see `inherited_text`)


def _too_big(limit: int, what: str) -> OSError:
    import errno

    size = f"{limit / 1e6:g} MB" if limit % 1_000_000 == 0 else f"{limit // 1024} KiB"
    return OSError(errno.EFBIG, f"{what} is larger than {size}, the most aim-llama reads; keep "
                                "only aim-llama's settings in it")


def inherited_text(path: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The text a parent read from the pipe that `AIM_LLAMA_CONFIG` names (see
    `CONFIG_TEXT_ENV`); None when `path` is a regular file or no parent passed a text on."""
    import stat

    env = os.environ if environ is None else environ
    value = env.get(CONFIG_TEXT_ENV)
    named = env.get(CONFIG_ENV, "").strip()
    if value is None or not named or value.count(":") < 2:
        return None
    dev, ino, text = value.split(":", 2)
    try:
        if os.path.abspath(os.path.expanduser(named)) != os.path.abspath(path):
            return None
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) or f"{st.st_dev}:{st.st_ino}" != f"{dev}:{ino}":
            return None  # a file, or another pipe under the same name (bash reuses /dev/fd/63)
    except OSError:
        pass  # the pipe is gone here (a child started with close_fds): the text stands for it
    return text.encode("utf-8", "surrogateescape")



def is_devnull(st: os.stat_result) -> bool:
    """Whether `st` is the null device's (reads as empty at once)."""
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (null.st_dev, null.st_ino)


def read_config(path: str, pipes: bool = True) -> bytes:
    """The bytes of a config file. A pipe or FIFO is read once per process (later calls get
    the same text, and so do the processes started after: `CONFIG_TEXT_ENV`) without ever
    blocking for more than `PIPE_WAIT` seconds; OSError (ETIMEDOUT when it gave nothing in
    time, EFBIG beyond the size aim-llama reads) as `open` would raise it. `pipes=False`
    (a file found by its default name, not named by the user): anything but a regular file
    is OSError(EINVAL) at once."""
    import stat

    inherited = inherited_text(path) if pipes else None
    if inherited is not None:
        return inherited
    st = os.stat(path)
    mode = st.st_mode
    if not pipes and not stat.S_ISREG(mode):
        if is_devnull(st):  # (a link to /dev/null: an empty file, which never blocks)
            return b""
        import errno

        raise OSError(errno.EINVAL, "not a regular file")
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise _too_big(MAX_CONFIG_BYTES, "the file")
        return data
    key = os.path.abspath(path)
    if key in _once:
        known = _once[key]
        if isinstance(known, OSError):
            raise known
        return known
    import errno
    import select
    import time

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    identity = os.fstat(fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + PIPE_WAIT
    try:
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                error = OSError(errno.ETIMEDOUT, f"no end of its text within {PIPE_WAIT:g}s "
                                "(a pipe or FIFO nobody writes to?)")
                _once[key] = error
                raise error
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_PIPE_BYTES:
                _once[key] = error = _too_big(MAX_PIPE_BYTES, "a config read from a pipe or device")
                raise error
    finally:
        os.close(fd)
    _once[key] = data = b"".join(chunks)
    _identity[key] = f"{identity.st_dev}:{identity.st_ino}:"
    if os.path.abspath(os.path.expanduser(os.environ.get(CONFIG_ENV, "").strip() or ".")) == key:
        # for this program's own Python children, which find the pipe empty or closed
        os.environ[CONFIG_TEXT_ENV] = pipe_text(path) or ""
    return data


def pipe_text(path: str) -> str | None:
    """`CONFIG_TEXT_ENV`'s value for the pipe at `path` read by this process (its identity,
    then its text), for a command it starts; None if `path` was not read as a pipe here."""
    key = os.path.abspath(path)
    known = _once.get(key)
    if not isinstance(known, bytes):
        return None
    return _identity[key] + known.decode("utf-8", "surrogateescape")


def decode(data: bytes) -> str:
    """A config file's text: UTF-8, with the byte-order mark some editors write left out."""
    return data.decode("utf-8-sig")


def _peek(path: str, table: tuple[str, ...], key: str, quick: bool,
          pipes: bool = True) -> tuple[bool, Any]:
    """(found, value) of `key` in `path`'s `table`; (False, None) when absent or unreadable
    (or, without `pipes`, not a regular file: never waited on). A file TOML cannot parse is
    read line by line: `strict = true` and the kill switch still count in a file whose other
    lines are broken (full validation reports the syntax)."""
    try:
        data = read_config(path, pipes)
    except (OSError, ValueError):
        return False, None
    if key.encode() not in data or (table and table[-1].encode() not in data):
        return False, None
    line_value = _key_line(data, table, key)
    if quick and line_value is None:
        return False, None
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        doc: Any = tomllib.loads(decode(data))
    except Exception:
        if line_value is None:
            return False, None
        return True, line_value.split(b"#", 1)[0].strip().decode("utf-8", "replace")
    for part in table:
        doc = doc.get(part) if isinstance(doc, dict) else None
    if isinstance(doc, dict) and key in doc:
        return True, doc[key]
    return False, None


def _key_line(data: bytes, table: tuple[str, ...], key: str) -> bytes | None:
    """The raw value of a plain `key = ...` line under the `[table]` header (top level: `()`),
    or None when there is no such line."""
    want = tuple(part.encode() for part in table)
    name = key.encode()
    header: tuple[bytes, ...] = ()
    for raw in data.removeprefix(b"\xef\xbb\xbf").splitlines():
        line = raw.strip()
        if line.startswith(b"["):
            inner = line.lstrip(b"[")
            end = inner.find(b"]")
            header = tuple(p.strip().strip(b"\"'") for p in inner[: max(end, 0)].split(b"."))
        elif header == want and line.startswith(name):
            rest = line[len(name):].lstrip()
            if rest[:1] == b"=":
                return rest[1:].strip()
    return None
