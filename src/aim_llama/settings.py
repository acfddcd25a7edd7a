"""aim-llama's settings: one pydantic-settings model, several sources, and where each value came from.

Precedence, highest first: keyword arguments to `instrument()` > environment > the TOML file
(`AIM_LLAMA_CONFIG`, else `./aim_llama.toml`) > `[tool.aim_llama]` in `./pyproject.toml` >
defaults. Every invalid value becomes one `ConfigError` line naming the setting, its source and
what is allowed.
"""

from __future__ import annotations

import contextvars
import difflib
import errno
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError, mask_secrets, one_line, secret_name
from .switches import (
    COMMAND_LINE_ENV,
    CONFIG_ENV,
    CONFIG_TEXT_ENV,
    DEFAULT_TOML,
    decode,
    here,
    inherited_text,
    is_devnull,
    read_config,
    settings_files,
    value_digest,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Set while `load_settings` validates the values it has already gathered from every source:
# the model then reads no source of its own (pydantic-settings would read them all again and
# deep-merge tables across sources).
_GATHERED: contextvars.ContextVar[bool] = contextvars.ContextVar("aim_llama_gathered", default=False)
# Run parameters aim-llama sets itself: a `run_params` key of these names would be overwritten.
RESERVED_PARAMS = frozenset({"aim_llama", "llm_models"})
# `AIM_LLAMA_*` variables that are not settings: set by aim-llama for its own processes.
INTERNAL_ENV = frozenset({CONFIG_ENV, CONFIG_TEXT_ENV, COMMAND_LINE_ENV, "AIM_LLAMA_LAUNCHED",
                          "AIM_LLAMA_ROLE"})


def command_line_option(var: str, environ: Mapping[str, str]) -> str | None:
    """The `aim-llama run` option that set env var `var` for this program, if one did and the
    variable still holds the value it set."""
    for part in environ.get(COMMAND_LINE_ENV, "").split(";"):
        name, _, option = part.partition("=")
        if name == var and option:
            option, _, digest = option.partition("@")
            if digest != value_digest(environ.get(var, "")):
                return None  # (changed since, by the program or one in between)
            return option
    return None


def env_source(var: str, environ: Mapping[str, str]) -> str:
    """How messages name where env var `var` came from: the option typed, or the variable."""
    option = command_line_option(var, environ)
    if not option:
        return f"env {var}"
    if not option.startswith("-"):  # another subcommand's option (`config --file`)
        return f"aim-llama {option}"
    return f"aim-llama run {option}, passed as env {var}"
MAX_SECONDS = 86_400  # a day: longer waits and intervals are mistakes (and overflow timeouts)

# LlamaIndex's CBEventType values (llama_index.core.callbacks.schema). Kept here so that
# validating a configuration never imports LlamaIndex; a test checks they stay in sync.
EVENT_TYPES: tuple[str, ...] = (
    "chunking",
    "node_parsing",
    "embedding",
    "llm",
    "query",
    "retrieve",
    "synthesize",
    "tree",
    "sub_question",
    "templating",
    "function_call",
    "reranking",
    "exception",
    "agent_step",
)

MAX_QUEUE_SIZE = 10_000_000
_OFF_WORDS = {"none", "off", "false", "no", "disable", "disabled"}

# One line of "what is allowed" per setting, appended to every error about it.
ALLOWED: dict[str, str] = {
    "repo": "a directory path or aim://host:port",
    "experiment": "any non-empty experiment name",
    "system_tracking_interval": "a whole number of seconds from 1 to 86400, or none/off/0 to disable",
    "log_system_params": "true or false (also yes/no, on/off, 1/0)",
    "capture_terminal_logs": "true or false (also yes/no, on/off, 1/0)",
    "event_starts_to_ignore": "LlamaIndex event types: " + ", ".join(EVENT_TYPES),
    "event_ends_to_ignore": "LlamaIndex event types: " + ", ".join(EVENT_TYPES),
    "run_params": "a JSON object / TOML table of run parameters",
    "enabled": "true or false (also yes/no, on/off, 1/0)",
    "strict": "true or false (also yes/no, on/off, 1/0)",
    "queue_size": f"a whole number of records from 100 to {MAX_QUEUE_SIZE}",
    "flush_timeout": "a number of seconds > 0 and <= 86400 (e.g. 10 or 2.5)",
    "writer": "process or thread",
    "propagate": "true or false (also yes/no, on/off, 1/0)",
    "capture_content": "true or false (also yes/no, on/off, 1/0)",
    "max_text_length": "a whole number of characters >= 1, or none/off/0 for no limit",
    "redact": "regular expressions (JSON list, or separated by newlines or by commas outside "
              "brackets and braces in env; list in TOML)",
    "redact_secrets": "true or false (also yes/no, on/off, 1/0)",
    "sample_rate": "a number from 0 to 1 (fraction of root requests whose texts are recorded)",
}


def _split_patterns(text: str) -> list[str]:
    """Regular expressions separated by newlines, or by commas outside groups, character
    classes and counts (so `sk-[a-z]{20,}` stays one pattern); `\\,` is part of its pattern."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0  # open ( and {
    in_class = False
    class_start = 0  # where the current character class began (its first `]` is literal)
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            if char == "]" and len(current) > class_start:
                in_class = False
        elif char == "[":
            in_class = True
            class_start = len(current) + 1
        elif char in "({":
            depth += 1
        elif char in ")}" and depth:
            depth -= 1
        elif char == "\n" or (char == "," and depth == 0):
            parts.append("".join(current))
            current = []
            continue
        if in_class and char == "^" and len(current) == class_start:
            class_start += 1  # `[^]...]`: the `]` after `^` is literal too
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _as_list(value: Any, split: Any, what: str, json_or_text: bool = False) -> list[Any]:
    """A list from a JSON list, text cut by `split`, or a list/tuple (None: empty).
    `json_or_text`: text that starts with `[` but is no JSON list is cut instead (a regular
    expression may well start with a character class)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                if not json_or_text:
                    raise ValueError(f"not a valid JSON list ({exc.msg})") from None
                value = split(text)
        else:
            value = split(text)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of {what}")
    return list(value)


def _parse_event_list(value: Any) -> Any:
    """Accept a JSON list, a comma-separated string, or a list; normalise names to lower case."""
    value = _as_list(value, lambda text: [p.strip() for p in text.split(",") if p.strip()],
                     "event types")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not an event type name")
        name = item.strip().lower()
        if name.startswith("cbeventtype."):
            name = name.split(".", 1)[1]
        if name not in EVENT_TYPES:
            close = difflib.get_close_matches(name, EVENT_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown event type {item!r}{hint}")
        names.append(name)
    return names


def _parse_regex_list(value: Any) -> Any:
    """Accept a JSON list, comma/newline-separated text, or a list; every item must compile."""
    value = _as_list(value, _split_patterns, "regular expressions", json_or_text=True)
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{item!r} is not a regular expression")
        try:
            re.compile(item)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {item!r} ({exc})") from None
    return value


def _parse_bool_strict(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"1", "true", "yes", "on", "y", "t"}:
            return True
        if text in {"0", "false", "no", "off", "n", "f"}:
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{value!r} is not a boolean")


StrictishBool = Annotated[bool, NoDecode]


class AimLlamaSettings(BaseSettings):
    """Everything aim-llama can be told. Field names are the TOML keys; env names are aliases."""

    model_config = SettingsConfigDict(
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        frozen=True,
    )

    repo: str | None = Field(None, validation_alias="AIM_REPO")
    experiment: str | None = Field(None, validation_alias="AIM_EXPERIMENT")
    system_tracking_interval: Annotated[int | None, NoDecode] = Field(
        1, validation_alias="AIM_SYSTEM_TRACKING_INTERVAL"
    )
    log_system_params: StrictishBool = Field(True, validation_alias="AIM_LOG_SYSTEM_PARAMS")
    capture_terminal_logs: StrictishBool = Field(True, validation_alias="AIM_CAPTURE_TERMINAL_LOGS")
    event_starts_to_ignore: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="AIM_EVENT_STARTS_TO_IGNORE"
    )
    event_ends_to_ignore: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="AIM_EVENT_ENDS_TO_IGNORE"
    )
    run_params: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, validation_alias="AIM_RUN_PARAMS"
    )
    enabled: StrictishBool = Field(True, validation_alias="AIM_LLAMA_ENABLED")
    strict: StrictishBool = Field(False, validation_alias="AIM_LLAMA_STRICT")
    queue_size: int = Field(50_000, validation_alias="AIM_LLAMA_QUEUE_SIZE")
    flush_timeout: float = Field(10.0, validation_alias="AIM_LLAMA_FLUSH_TIMEOUT")
    writer: Literal["process", "thread"] = Field("process", validation_alias="AIM_LLAMA_WRITER")
    propagate: StrictishBool = Field(True, validation_alias="AIM_LLAMA_PROPAGATE")
    capture_content: StrictishBool = Field(True, validation_alias="AIM_LLAMA_CAPTURE_CONTENT")
    max_text_length: Annotated[int | None, NoDecode] = Field(
        20_000, validation_alias="AIM_LLAMA_MAX_TEXT_LENGTH"
    )
    redact: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="AIM_LLAMA_REDACT"
    )
    redact_secrets: StrictishBool = Field(True, validation_alias="AIM_LLAMA_REDACT_SECRETS")
    sample_rate: float = Field(1.0, validation_alias="AIM_LLAMA_SAMPLE_RATE")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """kwargs > env (exact names, empty = unset) > TOML file > pyproject.toml > defaults.

        Built directly (`AimLlamaSettings()`), the model reads them through `_SourceLayers`;
        `load_settings` reads them itself (it names each value's source in errors) and
        validates what it gathered."""
        if _GATHERED.get():
            return (init_settings,)
        return (init_settings, _SourceLayers(settings_cls))

    @field_validator("repo", "experiment", mode="before")
    @classmethod
    def _non_empty_str(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, os.PathLike):  # instrument(repo=Path(...))
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        if not value.strip():
            raise ValueError("must not be empty")
        _check_utf8(value)
        return value.strip()

    @field_validator("repo", mode="after")
    @classmethod
    def _check_repo(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("a path cannot contain a NUL character")
        if value is not None and ("://" in value or value[:4].lower() == "aim:"):  # `aim:/h:1`
            match = re.fullmatch(r"aim://([^:/\s]+):(\d{1,5})/?", value)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"{value!r} is not an aim://host:port address")
        elif value is not None:
            problem = _file_in_the_way(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("system_tracking_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        seconds = _positive_or_off(value, "seconds")
        if seconds is not None and seconds > MAX_SECONDS:
            raise ValueError(f"{seconds} is more than a day ({MAX_SECONDS})")
        return seconds

    @field_validator(
        "log_system_params", "capture_terminal_logs", "enabled", "strict", "propagate",
        "capture_content", "redact_secrets", mode="before"
    )
    @classmethod
    def _bool(cls, value: Any) -> Any:
        return _parse_bool_strict(value)

    @field_validator("event_starts_to_ignore", "event_ends_to_ignore", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        return _parse_event_list(value)

    @field_validator("run_params", mode="before")
    @classmethod
    def _run_params(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be an object of key/value pairs, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str) or not key or key.startswith("__"):
                raise ValueError(f"key {key!r} is not allowed (empty or starting with '__')")
            if key in RESERVED_PARAMS:
                raise ValueError(f"key {key!r} is aim-llama's own run parameter; use another name")
        _check_utf8(json.dumps(value, ensure_ascii=False, default=str))
        return value

    @field_validator("queue_size", mode="before")
    @classmethod
    def _queue_size(cls, value: Any) -> Any:
        value = _whole_number(value)
        if value < 100:
            raise ValueError(f"{value} is below 100")
        if value > MAX_QUEUE_SIZE:  # (the queue is the memory bound: it must be one)
            raise ValueError(f"{value} is more than {MAX_QUEUE_SIZE}")
        return value

    @field_validator("flush_timeout", mode="before")
    @classmethod
    def _flush_timeout(cls, value: Any) -> Any:
        value = _number(value)
        if value <= 0:
            raise ValueError(f"{value:.10g} is not > 0")
        if value > MAX_SECONDS:
            raise ValueError(f"{value:.10g} is more than a day ({MAX_SECONDS})")
        return float(value)

    @field_validator("max_text_length", mode="before")
    @classmethod
    def _max_text_length(cls, value: Any) -> Any:
        return _positive_or_off(value, "characters")

    @field_validator("redact", mode="before")
    @classmethod
    def _redact(cls, value: Any) -> Any:
        return _parse_regex_list(value)

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _sample_rate(cls, value: Any) -> Any:
        value = _number(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{value} is not between 0 and 1")
        return float(value)

    @field_validator("writer", mode="before")
    @classmethod
    def _writer(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower()
        return value


def check_resolvable(loaded: LoadedSettings) -> None:
    """The default repo (`.aim` in the working directory), or a relative one, needs a working
    directory: one deleted under the program leaves nowhere to store — a ConfigError now, not
    records lost at exit. (Not part of validation: a process that never uses LlamaIndex may
    run anywhere, even in strict mode.)"""
    repo = loaded.settings.repo
    if repo is not None and ("://" in repo or os.path.isabs(os.path.expanduser(repo))):
        return
    if here() is not None:
        return
    what = "the default repo (.aim in it)" if repo is None else f"the relative path {repo!r}"
    source = loaded.sources.get("repo", "default")
    raise ConfigError(
        f"invalid setting repo ({source}): the working directory no longer exists, so {what} "
        "cannot be resolved; set AIM_REPO to an absolute path",
        setting="repo", source=source)


def _check_utf8(text: str) -> None:
    """Aim stores text as UTF-8: bytes that are not (an environment variable set from a
    Latin-1 terminal reaches Python as surrogates) would fail when the run is created."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds bytes that are not UTF-8 (at position {exc.start})") from None


def _number(value: Any) -> float:
    """A finite-or-infinite float from a number or numeric text; NaN and booleans rejected."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if not isinstance(value, (int, float)) or value != value:  # NaN
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _positive_or_off(value: Any, unit: str) -> int | None:
    """A whole number >= 1, or None for none/off/false/0 (e.g. an interval or a length limit)."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in _OFF_WORDS:
        return None
    try:
        number = _whole_number(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number of {unit}") from None
    if number < 0:
        raise ValueError(f"{number} is negative")
    return number or None


def _whole_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"{value!r} is not a whole number")


FIELDS: dict[str, FieldInfo] = AimLlamaSettings.model_fields
ENV_NAMES: dict[str, str] = {name: str(info.validation_alias) for name, info in FIELDS.items()}


class ExactEnvSource(PydanticBaseSettingsSource):
    """Reads each setting from its exact env var name; an empty variable counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None):
        super().__init__(settings_cls)
        self._environ = os.environ if environ is None else environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raw = self._environ.get(ENV_NAMES[field_name], "")
        return (raw if raw.strip() else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in FIELDS:
            raw, _, _ = self.get_field_value(FIELDS[name], name)
            if raw is not None:
                values[name] = raw
        return values


def _file_in_the_way(repo: str) -> str | None:
    """Why a local repo path can never be a directory — it, or a directory on its way, is a
    file — or None (a path that can be made, or one that cannot be checked: the writer's
    own error then says why). A few `stat`s; never raises."""
    try:
        wanted = os.path.expanduser(repo)
        if not os.path.isabs(wanted):
            base = here()
            if base is None:
                return None
            wanted = os.path.join(base, wanted)
        path = wanted = os.path.abspath(wanted)
        while True:
            try:
                is_dir = os.path.isdir(path) if os.path.lexists(path) else None
            except OSError:
                return None
            if is_dir is None:  # (not there yet: it will be made, if what holds it can be)
                parent = os.path.dirname(path)
                if parent == path:
                    return None
                path = parent
                continue
            if is_dir:
                return None
            if not os.path.exists(path):
                return None  # (a dangling symlink: Aim's error says more than we could)
            if path == wanted:
                return f"{repo!r} is a file, not a directory"
            return f"{repo!r} cannot be a directory: {path!r} on its way is a file"
    except Exception:
        return None


def config_file_path(environ: Mapping[str, str]) -> tuple[Path | None, bool, Path | None]:
    """(the TOML file, whether `AIM_LLAMA_CONFIG` named it (then it must exist),
    pyproject.toml); None where the working directory was deleted (see `switches`)."""
    try:
        toml, explicit, pyproject = settings_files(environ)
    except RuntimeError as exc:  # `~user/...` for a user that does not exist
        named = environ.get(CONFIG_ENV, "").strip()
        raise ConfigError(
            f"config file {named!r} named by {env_source(CONFIG_ENV, environ)} cannot be found: "
            f"{exc}; point it at a readable TOML file or unset it",
            setting=CONFIG_ENV,
            source=env_source(CONFIG_ENV, environ),
        ) from None
    return (None if toml is None else Path(toml)), explicit, (
        None if pyproject is None else Path(pyproject))


@dataclass(frozen=True)
class LoadedSettings:
    """Validated settings plus, for every field, the source its value came from."""

    settings: AimLlamaSettings
    sources: dict[str, str]
    warnings: tuple[str, ...] = ()  # one line each: what was skipped (the settings stand)


def _fmt_value(value: Any, field: str = "") -> str:
    """A value as a message quotes it: masked (`mask_secrets`), then cut to 60 characters
    (masked first: a cut URL has lost the `@` that tells its password)."""
    text = mask_secrets(repr(value), keys=field != "redact")
    return text if len(text) <= 60 else text[:57] + "...'"


def _describe(source_kind: str, field: str, value: Any, file_label: str = "") -> str:
    if source_kind == "env":  # (`file_label`: the `aim-llama run` option that set it, if any)
        if file_label.startswith("--"):
            return (f"aim-llama run {file_label} {_fmt_value(value, field)}, passed as env "
                    f"{ENV_NAMES[field]}")
        return f"env {ENV_NAMES[field]}={_fmt_value(value, field)}"
    if source_kind == "kwargs":
        return f"instrument({field}={_fmt_value(value, field)})"
    return f"{file_label}: {field} = {_fmt_value(value, field)}"


def _read_toml(path: Path, label: str, table: tuple[str, ...], source: str,
               data: bytes | None = None) -> dict[str, Any]:
    """aim-llama's table of one TOML file (whose bytes may be read already); every failure
    becomes a one-line ConfigError."""
    try:
        if data is None:
            data = read_config(str(path))
        doc: Any = tomllib.loads(decode(data))
    except PermissionError:
        raise ConfigError(
            f"cannot read config file {os.path.abspath(path)}: permission denied; make it readable or set "
            f"{CONFIG_ENV} to another file",
            setting=CONFIG_ENV,
            source=source,
        ) from None
    except OSError as exc:
        fix = "" if exc.errno == errno.EFBIG else (  # (that one says what to do itself)
            f"; make it a readable TOML file or set {CONFIG_ENV} to another file")
        raise ConfigError(
            f"cannot read config file {os.path.abspath(path)}: {exc.strerror or exc}{fix}",
            setting=CONFIG_ENV,
            source=source,
        ) from None
    except UnicodeDecodeError as exc:  # (no TOML syntax to fix: the encoding)
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{label} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
            "save it as UTF-8",
            setting=".".join(table) or None,
            source=str(path),
        ) from None
    except Exception as exc:  # tomllib.TOMLDecodeError …
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{label} is not valid TOML: {detail}; fix the syntax (https://toml.io)",
            setting=".".join(table) or None,
            source=str(path),
        ) from None
    root = doc
    for depth, part in enumerate(table):
        doc = doc.get(part, {})
        if not isinstance(doc, dict):
            name = ".".join(table[: depth + 1])
            raise ConfigError(
                f"{os.path.abspath(path)}: {name} = {_fmt_value(doc)} is not a table; aim-llama's "
                f"settings go in a [{'.'.join(table)}] table",
                setting=".".join(table),
                source=str(path),
            )
    table_values: dict[str, Any] = doc
    if table == ("tool", "aim_llama") and "aim-llama" in root.get("tool", {}):
        raise ConfigError(
            f"{path}: [tool.aim-llama] is not read; aim-llama's table is [tool.aim_llama] "
            "(with an underscore)",
            setting="tool.aim-llama",
            source=str(path),
        )
    unknown = [key for key in table_values if key not in FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if not table and isinstance(table_values.get("tool"), dict) and (
                "aim_llama" in table_values["tool"]):
            hint = ("a config file holds aim-llama's settings at its top level, not in a "
                    "[tool.aim_llama] table (that one is read from pyproject.toml); ")
        raise ConfigError(
            f"{label}: unknown setting {key!r}; {hint}known settings: {', '.join(FIELDS)}",
            setting=key,
            source=label,
        )
    return table_values


def _anchor_repo(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A relative `repo` in a config file names a directory beside that file (as other tools
    read paths in their config files), not one in whichever directory a process starts in."""
    repo = data.get("repo")
    if not isinstance(repo, str) or not repo.strip() or "://" in repo or (
            repo.strip()[:4].lower() == "aim:"):  # (a misspelt address: validation says so)
        return data
    repo = os.path.expanduser(repo.strip())
    if os.path.isabs(repo) or not path.is_file():  # a pipe's "directory" means nothing
        return data
    return {**data, "repo": os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(path)), repo))}


def _exists(path: Path, explicit: bool, named_by: str = f"env {CONFIG_ENV}") -> bool:
    """Whether the config file exists; a path the system rejects is a one-line ConfigError."""
    try:
        return path.exists()
    except OSError as exc:  # a name too long, a directory on the way that cannot be entered …
        raise ConfigError(
            f"config file {os.path.abspath(path)[:200]!r}"
            f"{' (named by ' + named_by + ')' if explicit else ''} cannot be checked: {exc.strerror or exc}; "
            f"{'point ' + CONFIG_ENV + ' at' if explicit else 'use'} a readable TOML file",
            setting=CONFIG_ENV,
            source=named_by if explicit else str(path)[:200],
        ) from None


def _not_a_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file ("a directory", "a FIFO", …), else None."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return None  # (gone since: reading it says why)
    mode = st.st_mode
    if stat.S_ISREG(mode) or is_devnull(st):  # (/dev/null: an empty file)
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")


def _broken_link(path: Path) -> str | None:
    """What is wrong with a name that is a symlink leading nowhere ("is a symlink loop",
    "is a symlink to …, which does not exist"); None for anything else."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        try:
            if os.path.islink(path):
                return f"is a symlink to {os.readlink(path)!r}, which does not exist"
        except OSError:
            return None
    return None


_OUR_TABLE = re.compile(
    rb"^[ \t]*(?:\[[ \t]*tool[ \t]*\.[ \t]*[\"']?aim[-_]llama|tool[ \t]*\.[ \t]*[\"']?aim[-_]llama)",
    re.MULTILINE,
)


def _our_table(text: bytes) -> bool:
    """Whether pyproject.toml's text has a line that opens or sets aim-llama's table."""
    return _OUR_TABLE.search(text) is not None


_HEADER_LINE = re.compile(rb"^[ \t]*\[\[?[ \t]*([^\]]*)\]")


def _our_section(text: bytes) -> bytes:
    """The lines of pyproject.toml under `[tool.aim_llama]` headers (and its sub-tables) only,
    each line kept in its place (blank elsewhere) so that errors keep their line numbers."""
    lines = text.splitlines()
    ours = False
    out = []
    for line in lines:
        match = _HEADER_LINE.match(line)
        if match is not None:
            name = b"".join(match.group(1).split()).replace(b'"', b"").replace(b"'", b"")
            ours = name.startswith((b"tool.aim_llama", b"tool.aim-llama"))
        elif line.lstrip().startswith(b"["):  # a header broken itself: ours if it names us
            ours = _our_table(line.lstrip()) or (ours and not line.lstrip().startswith(b"[["))
        out.append(line if ours else b"")
    return b"\n".join(out) + b"\n"


def _parses(text: bytes) -> bool:
    try:
        tomllib.loads(decode(text))
    except Exception:
        return False
    return True


def _file_layers(env: Mapping[str, str], notes: list[str] | None = None,
                 ) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, label, values) of pyproject.toml's [tool.aim_llama] and the TOML file, lowest
    precedence first; any problem with them is a one-line ConfigError (a pyproject.toml that
    cannot be read is skipped, with a line in `notes`)."""
    layers: list[tuple[str, str, dict[str, Any]]] = []
    toml_path, explicit, pyproject = config_file_path(env)
    if pyproject is not None and _exists(pyproject, False) and pyproject.is_file():
        label = f"{one_line(str(pyproject))} [tool.aim_llama]"  # (labels name sources: one line)
        try:
            text: bytes | None = read_config(str(pyproject), pipes=False)
        except OSError as exc:  # the project's file, maybe not ours at all: skipped, said once
            if notes is not None:
                notes.append(f"cannot read {one_line(str(pyproject))} ({exc.strerror or exc}): its "
                             "[tool.aim_llama] table, if any, is not applied; recording continues")
            text = None
        # A project file that never mentions aim-llama is not ours to judge, even if broken;
        # nor is one whose syntax error we cannot tie to aim-llama's table.
        if text is not None and (b"aim_llama" in text or b"aim-llama" in text) \
                and _our_table(text) and not _parses(text):
            # Broken somewhere: judge only aim-llama's own table (a syntax error in
            # [tool.ruff] is ruff's business, not a reason to run uninstrumented).
            text = _our_section(text)
        if text is not None and ((b"aim_llama" in text or b"aim-llama" in text)
                                 and (_our_table(text) or _parses(text))):
            data = _read_toml(pyproject, label, ("tool", "aim_llama"), str(pyproject), text)
            layers.append(("file", label, data))

    named_by = env_source(CONFIG_ENV, env)
    if (toml_path is not None and explicit and not _exists(toml_path, True, named_by)
            and inherited_text(str(toml_path), env) is None):
        raise ConfigError(
            f"config file {os.path.abspath(toml_path)!r} "
            f"{_broken_link(toml_path) or 'does not exist'} (named by {named_by}); "
            "point it at a readable TOML file or unset it",
            setting=CONFIG_ENV,
            source=named_by,
        )
    broken = None if toml_path is None or explicit else _broken_link(toml_path)
    if broken is not None and toml_path is not None:
        raise ConfigError(
            f"{os.path.abspath(toml_path)!r} {broken}, but aim-llama reads its settings from a "
            f"TOML file of that name in the working directory; remove the link or set "
            f"{CONFIG_ENV} to a TOML file",
            setting=DEFAULT_TOML,
            source=str(toml_path),
        )
    if toml_path is not None and (_exists(toml_path, explicit, named_by)
                                  or (explicit and inherited_text(str(toml_path), env) is not None)):
        kind = _not_a_file(toml_path)  # (by its default name, even a pipe: never waited on)
        if kind is not None and (not explicit or kind == "a directory"):
            raise ConfigError(
                f"config file {os.path.abspath(toml_path)!r} is a directory; {CONFIG_ENV} must name a "
                "TOML file" if explicit else
                f"{os.path.abspath(toml_path)!r} is {kind}, but aim-llama reads its settings from a "
                f"TOML file of that name in the working directory; rename it or set "
                f"{CONFIG_ENV} to a TOML file",
                setting=CONFIG_ENV if explicit else DEFAULT_TOML,
                source=named_by if explicit else str(toml_path),
            )
        label = one_line(os.path.abspath(toml_path))
        data = _read_toml(toml_path, label, (), named_by if explicit else str(toml_path))
        layers.append(("file", label, _anchor_repo(data, toml_path)))

    return layers


class _SourceLayers(PydanticBaseSettingsSource):
    """The environment and the files, each value whole from its highest source (direct builds)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: `__call__` reads everything at once

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _kind, _label, values in [*_file_layers(os.environ),
                                      ("env", "env", ExactEnvSource(self.settings_cls)())]:
            merged.update(values)
        return merged


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> LoadedSettings:
    """Read every source in precedence order and validate; raise ConfigError (one line) if invalid."""
    env = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    notes: list[str] = []
    layers = _file_layers(env, notes)
    _check_env_names(env)
    layers.append(("env", "env", ExactEnvSource(AimLlamaSettings, env)()))

    for key in overrides:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"instrument(): unknown setting {key!r}; {hint}known settings: {', '.join(FIELDS)}",
                setting=key,
                source="instrument()",
            )
    layers.append(("kwargs", "instrument()", overrides))

    merged: dict[str, Any] = {}
    origin: dict[str, tuple[str, str]] = {}
    for kind, label, values in layers:
        for key, value in values.items():
            merged[key] = value
            origin[key] = (kind, label)
            if kind == "env":
                origin[key] = (kind, command_line_option(ENV_NAMES[key], env) or label)

    token = _GATHERED.set(True)
    try:
        settings = AimLlamaSettings.model_validate(merged)
    except ValidationError as exc:
        raise _to_config_error(exc, merged, origin) from None
    finally:
        _GATHERED.reset(token)

    sources = {}
    for name in FIELDS:
        if name in origin:
            kind, label = origin[name]
            sources[name] = (
                env_source(ENV_NAMES[name], env) if kind == "env"
                else "instrument()" if kind == "kwargs"
                else f"{label}: {name}"
            )
        else:
            sources[name] = "default"
    return LoadedSettings(settings=settings, sources=sources, warnings=tuple(notes))


def _check_env_names(env: Mapping[str, str]) -> None:
    """An `AIM_LLAMA_*` variable that names no setting is a typo (`AIM_LLAMA_REPO` for
    `AIM_REPO`, say): a one-line ConfigError, as an unknown key in a TOML file is."""
    known = set(ENV_NAMES.values()) | INTERNAL_ENV
    for name in env:
        if not name.startswith("AIM_LLAMA_") or name in known:
            continue
        if not env[name].strip():  # empty counts as unset (a compose file's blank variable)
            continue
        short = "AIM_" + name.removeprefix("AIM_LLAMA_")
        if short in known:
            hint = f"did you mean {short}? "
        else:
            close = difflib.get_close_matches(name, sorted(known - INTERNAL_ENV), n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}? " if close else ""
        listed = f"{', '.join(ENV_NAMES[f] for f in FIELDS)}, {CONFIG_ENV}"
        raise ConfigError(
            f"unknown environment variable {name}; {hint}aim-llama's variables: {listed}",
            setting=name,
            source=f"env {name}",
        )


def _to_config_error(
    exc: ValidationError, merged: dict[str, Any], origin: dict[str, tuple[str, str]]
) -> ConfigError:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "literal_error":
        message = f"{merged.get(field)!r} is not one of the choices"
    elif error["type"] in {"int_type", "int_parsing", "float_type", "float_parsing", "string_type"}:
        message = f"{merged.get(field)!r} has the wrong type"
    elif error["type"] == "dict_type":
        message = f"must be a table/object, got {type(merged.get(field)).__name__}"
    if len(message) > 300:  # a long bad value is shown (cut) once, in `where`, not again here
        message = message[:150] + " … " + message[-120:]
    kind, label = origin.get(field, ("default", "default"))
    where = _describe(kind, field, merged.get(field), label) if field in merged else "default"
    allowed = ALLOWED.get(field, "")
    return ConfigError(
        f"invalid setting {field} ({where}): {message}; allowed: {allowed}",
        setting=field,
        source=where,
    )




def redact_for_display(name: str, value: Any) -> Any:
    """Mask secrets before printing settings: credentials in URLs, the built-in secret
    patterns (`sk-…`, `Bearer …`), the values of secret-looking names, in lists too."""
    if isinstance(value, str):
        return mask_secrets(value, keys=False)
    if isinstance(value, dict):
        return {
            k: ("***" if secret_name(str(k)) else redact_for_display(str(k), v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_for_display(name, v) for v in value]
    return value
