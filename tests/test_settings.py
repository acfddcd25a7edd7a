"""Settings: precedence, provenance, and one clear line for every kind of bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aim_llama.errors import ConfigError, mask_secrets, secret_name
from aim_llama.settings import EVENT_TYPES, AimLlamaSettings, check_resolvable, load_settings


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("AIM_"):
            monkeypatch.delenv(key)
    return tmp_path


def test_event_types_match_llamaindex() -> None:
    from llama_index.core.callbacks.schema import CBEventType

    assert set(EVENT_TYPES) == {e.value for e in CBEventType}


def test_defaults(cwd: Path) -> None:
    loaded = load_settings(environ={})
    s = loaded.settings
    assert s.repo is None and s.experiment is None
    assert s.system_tracking_interval == 1
    assert s.log_system_params and s.capture_terminal_logs and s.enabled and not s.strict
    assert s.event_starts_to_ignore == [] and s.run_params == {}
    assert set(loaded.sources.values()) == {"default"}


def test_precedence_kwargs_env_toml_pyproject(cwd: Path) -> None:
    (cwd / "pyproject.toml").write_text(
        '[tool.aim_llama]\nrepo = "from-pyproject"\nexperiment = "pp"\n'
        'system_tracking_interval = 7\nqueue_size = 1234\n'
    )
    (cwd / "aim_llama.toml").write_text('experiment = "toml"\nsystem_tracking_interval = 5\n')
    env = {"AIM_SYSTEM_TRACKING_INTERVAL": "3", "AIM_EXPERIMENT": ""}  # empty = unset
    loaded = load_settings({"system_tracking_interval": 2}, environ=env)
    s = loaded.settings
    assert s.system_tracking_interval == 2 and loaded.sources["system_tracking_interval"] == "instrument()"
    assert s.experiment == "toml"
    assert loaded.sources["experiment"] == f"{Path.cwd() / 'aim_llama.toml'}: experiment"
    assert s.repo == "from-pyproject"
    assert loaded.sources["repo"] == f"{Path.cwd() / 'pyproject.toml'} [tool.aim_llama]: repo"
    assert s.queue_size == 1234
    env_only = load_settings(environ=env)
    assert env_only.settings.system_tracking_interval == 3
    assert env_only.sources["system_tracking_interval"] == "env AIM_SYSTEM_TRACKING_INTERVAL"


def test_explicit_config_file_wins_over_default_file(cwd: Path) -> None:
    (cwd / "aim_llama.toml").write_text('experiment = "default-file"\n')
    other = cwd / "conf" / "prod.toml"
    other.parent.mkdir()
    other.write_text('experiment = "named"\n[run_params]\nteam = "search"\n')
    s = load_settings(environ={"AIM_LLAMA_CONFIG": str(other)}).settings
    assert s.experiment == "named" and s.run_params == {"team": "search"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AIM_SYSTEM_TRACKING_INTERVAL": "none"}, None),
        ({"AIM_SYSTEM_TRACKING_INTERVAL": "OFF"}, None),
        ({"AIM_SYSTEM_TRACKING_INTERVAL": "0"}, None),
        ({"AIM_SYSTEM_TRACKING_INTERVAL": "15"}, 15),
    ],
)
def test_interval_forms(cwd: Path, env: dict[str, str], expected: int | None) -> None:
    assert load_settings(environ=env).settings.system_tracking_interval == expected


def test_event_lists_comma_json_and_case(cwd: Path) -> None:
    s = load_settings(
        environ={
            "AIM_EVENT_STARTS_TO_IGNORE": "LLM, chunking",
            "AIM_EVENT_ENDS_TO_IGNORE": '["Embedding", "CBEventType.QUERY"]',
        }
    ).settings
    assert s.event_starts_to_ignore == ["llm", "chunking"]
    assert s.event_ends_to_ignore == ["embedding", "query"]


def test_plain_pydantic_settings_model_reads_every_source_in_order(
        cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIM_EXPERIMENT", "via-model")
    monkeypatch.setenv("AIM_RUN_PARAMS", '{"a": 1}')
    # the same precedence as `load_settings`: the environment over the files, which fill in
    (cwd / "aim_llama.toml").write_text('experiment = "from-file"\nqueue_size = 123\n')
    (cwd / "pyproject.toml").write_text('[tool.aim_llama]\nqueue_size = 700\nflush_timeout = 3.5\n')
    s = AimLlamaSettings()
    assert s.experiment == "via-model" and s.run_params == {"a": 1}
    assert s.queue_size == 123 and s.flush_timeout == 3.5
    # and keyword arguments over everything
    assert AimLlamaSettings(experiment="kw", queue_size=500).model_dump(
        include={"experiment", "queue_size"}) == {"experiment": "kw", "queue_size": 500}


# (environment, files {name: text}, overrides, fragments the one-line message must contain)
BAD: list[tuple[str, dict[str, str], dict[str, str], dict[str, object], list[str]]] = [
    ("interval-word", {"AIM_SYSTEM_TRACKING_INTERVAL": "abc"}, {}, {},
     ["system_tracking_interval", "env AIM_SYSTEM_TRACKING_INTERVAL='abc'", "whole number"]),
    ("interval-negative", {"AIM_SYSTEM_TRACKING_INTERVAL": "-5"}, {}, {},
     ["system_tracking_interval", "AIM_SYSTEM_TRACKING_INTERVAL='-5'", "negative"]),
    ("interval-float", {"AIM_SYSTEM_TRACKING_INTERVAL": "1.5"}, {}, {},
     ["system_tracking_interval", "'1.5'", "none/off/0"]),
    ("interval-toml-string", {}, {"aim_llama.toml": 'system_tracking_interval = "soon"\n'}, {},
     ["system_tracking_interval", "aim_llama.toml: system_tracking_interval = 'soon'"]),
    ("interval-toml-float", {}, {"aim_llama.toml": "system_tracking_interval = 2.5\n"}, {},
     ["system_tracking_interval", "aim_llama.toml", "2.5"]),
    ("bool-env", {"AIM_LOG_SYSTEM_PARAMS": "maybe"}, {}, {},
     ["log_system_params", "env AIM_LOG_SYSTEM_PARAMS='maybe'", "true or false"]),
    ("bool-terminal", {"AIM_CAPTURE_TERMINAL_LOGS": "2"}, {}, {},
     ["capture_terminal_logs", "AIM_CAPTURE_TERMINAL_LOGS='2'"]),
    ("bool-enabled-toml", {}, {"aim_llama.toml": 'enabled = "sometimes"\n'}, {},
     ["enabled", "aim_llama.toml: enabled", "true or false"]),
    ("bool-strict-int", {}, {"aim_llama.toml": "strict = 3\n"}, {},
     ["strict", "aim_llama.toml: strict = 3"]),
    ("event-unknown", {"AIM_EVENT_STARTS_TO_IGNORE": "llm,retreive"}, {}, {},
     ["event_starts_to_ignore", "AIM_EVENT_STARTS_TO_IGNORE", "'retreive'", "did you mean 'retrieve'"]),
    ("event-bad-json", {"AIM_EVENT_ENDS_TO_IGNORE": '["llm",'}, {}, {},
     ["event_ends_to_ignore", "not a valid JSON list"]),
    ("event-not-string", {"AIM_EVENT_ENDS_TO_IGNORE": "[1, 2]"}, {}, {},
     ["event_ends_to_ignore", "1 is not an event type name"]),
    ("event-toml-type", {}, {"aim_llama.toml": "event_starts_to_ignore = 5\n"}, {},
     ["event_starts_to_ignore", "aim_llama.toml", "list of event types"]),
    ("event-toml-unknown", {}, {"aim_llama.toml": 'event_ends_to_ignore = ["lm"]\n'}, {},
     ["event_ends_to_ignore", "unknown event type 'lm'", "did you mean 'llm'"]),
    ("run-params-json", {"AIM_RUN_PARAMS": "{team: x}"}, {}, {},
     ["run_params", "env AIM_RUN_PARAMS", "not valid JSON"]),
    ("run-params-list", {"AIM_RUN_PARAMS": "[1, 2]"}, {}, {},
     ["run_params", "must be an object", "list"]),
    ("run-params-dunder", {"AIM_RUN_PARAMS": '{"__system_params": 1}'}, {}, {},
     ["run_params", "'__system_params' is not allowed"]),
    ("run-params-toml-scalar", {}, {"aim_llama.toml": "run_params = 3\n"}, {},
     ["run_params", "aim_llama.toml: run_params = 3"]),
    ("repo-empty-toml", {}, {"aim_llama.toml": 'repo = "  "\n'}, {},
     ["repo", "aim_llama.toml: repo", "must not be empty"]),
    ("repo-bad-url", {"AIM_REPO": "aim://host"}, {}, {},
     ["repo", "env AIM_REPO='aim://host'", "aim://host:port"]),
    ("repo-bad-port", {"AIM_REPO": "aim://127.0.0.1:99999"}, {}, {},
     ["repo", "aim://host:port"]),
    ("repo-one-slash", {"AIM_REPO": "aim:/host:53800"}, {}, {},
     ["invalid setting repo (env AIM_REPO='aim:/host:53800')",
      "'aim:/host:53800' is not an aim://host:port address"]),
    ("repo-no-slash", {"AIM_REPO": "AIM:host:53800"}, {}, {},
     ["'AIM:host:53800' is not an aim://host:port address"]),
    ("repo-no-slash-toml", {}, {"aim_llama.toml": 'repo = "aim:host:53800"\n'}, {},
     ["aim_llama.toml: repo = 'aim:host:53800'", "'aim:host:53800' is not an aim://host:port"]),
    ("repo-not-string", {}, {"aim_llama.toml": "repo = 12\n"}, {},
     ["repo", "aim_llama.toml: repo = 12", "not a string"]),
    ("experiment-table", {}, {"aim_llama.toml": "[experiment]\nname = 'x'\n"}, {},
     ["experiment", "aim_llama.toml", "not a string"]),
    ("unknown-toml-key", {}, {"aim_llama.toml": 'experimnet = "x"\n'}, {},
     ["aim_llama.toml", "unknown setting 'experimnet'", "did you mean 'experiment'"]),
    ("unknown-pyproject-key", {}, {"pyproject.toml": "[tool.aim_llama]\nrepoo = '.'\n"}, {},
     ["pyproject.toml [tool.aim_llama]", "unknown setting 'repoo'", "did you mean 'repo'"]),
    ("toml-syntax", {}, {"aim_llama.toml": 'experiment = "x\n'}, {},
     ["aim_llama.toml is not valid TOML", "line 1"]),
    ("pyproject-syntax", {}, {"pyproject.toml": "[tool.aim_llama\nrepo='x'\n"}, {},
     ["pyproject.toml [tool.aim_llama] is not valid TOML"]),
    ("config-missing", {"AIM_LLAMA_CONFIG": "nope/missing.toml"}, {}, {},
     ["/nope/missing.toml' does not exist (named by env AIM_LLAMA_CONFIG)"]),
    ("repo-is-a-file", {"AIM_REPO": "notes.txt"}, {"notes.txt": "x\n"}, {},
     ["invalid setting repo (env AIM_REPO='notes.txt')", "'notes.txt' is a file, not a directory",
      "allowed: a directory path or aim://host:port"]),
    ("repo-under-a-file", {}, {"aim_llama.toml": 'repo = "notes.txt/runs"\n', "notes.txt": "x\n"},
     {}, ["aim_llama.toml: repo = ", "cannot be a directory", "notes.txt' on its way is a file"]),
    ("config-directory", {"AIM_LLAMA_CONFIG": "."}, {}, {},
     ["is a directory", "AIM_LLAMA_CONFIG"]),
    ("queue-size-small", {"AIM_LLAMA_QUEUE_SIZE": "5"}, {}, {},
     ["queue_size", "AIM_LLAMA_QUEUE_SIZE='5'", "below 100"]),
    ("queue-size-huge", {"AIM_LLAMA_QUEUE_SIZE": "9" * 29}, {}, {},
     ["queue_size", "is more than 10000000", "from 100 to 10000000"]),
    ("repo-nul", {}, {"aim_llama.toml": 'repo = "r\\u0000x"\n'}, {},
     ["repo", "aim_llama.toml: repo", "cannot contain a NUL character"]),
    ("config-is-a-pyproject", {}, {"aim_llama.toml": "[tool.aim_llama]\nqueue_size = 500\n"}, {},
     ["unknown setting 'tool'", "at its top level, not in a [tool.aim_llama] table"]),
    ("queue-size-99", {"AIM_LLAMA_QUEUE_SIZE": "99"}, {}, {}, ["queue_size", "99 is below 100"]),
    ("queue-size-one-over", {"AIM_LLAMA_QUEUE_SIZE": "10000001"}, {}, {},
     ["queue_size", "is more than 10000000"]),
    ("flush-timeout-over-a-day", {"AIM_LLAMA_FLUSH_TIMEOUT": "86400.5"}, {}, {},
     ["flush_timeout", "86400.5 is more than a day"]),
    ("interval-over-a-day", {"AIM_SYSTEM_TRACKING_INTERVAL": "86401"}, {}, {},
     ["system_tracking_interval", "86401 is more than a day"]),
    ("queue-size-word", {"AIM_LLAMA_QUEUE_SIZE": "lots"}, {}, {},
     ["queue_size", "'lots' is not a whole number"]),
    ("flush-timeout-zero", {"AIM_LLAMA_FLUSH_TIMEOUT": "0"}, {}, {},
     ["flush_timeout", "AIM_LLAMA_FLUSH_TIMEOUT='0'", "> 0"]),
    ("flush-timeout-nan", {"AIM_LLAMA_FLUSH_TIMEOUT": "nan"}, {}, {},
     ["flush_timeout", "not a number"]),
    ("flush-timeout-huge", {"AIM_LLAMA_FLUSH_TIMEOUT": "2147484"}, {}, {},
     ["flush_timeout", "AIM_LLAMA_FLUSH_TIMEOUT='2147484'", "2147484 is more than a day", "86400"]),
    ("interval-huge", {"AIM_SYSTEM_TRACKING_INTERVAL": "99999999999999999999"}, {}, {},
     ["system_tracking_interval", "more than a day", "from 1 to 86400"]),
    ("config-endless-device", {"AIM_LLAMA_CONFIG": "/dev/zero"}, {}, {},
     ["cannot read config file /dev/zero: a config read from a pipe or device is larger than "
      "32 KiB, the most aim-llama reads; keep only aim-llama's settings in it"]),
    ("config-name-too-long", {"AIM_LLAMA_CONFIG": "a" * 300}, {}, {},
     ["cannot be checked", "File name too long", "env AIM_LLAMA_CONFIG"]),
    ("config-unknown-user", {"AIM_LLAMA_CONFIG": "~nosuchuser-aimllama/x.toml"}, {}, {},
     ["'~nosuchuser-aimllama/x.toml'", "env AIM_LLAMA_CONFIG", "cannot be found"]),
    ("pyproject-tool-not-a-table", {}, {"pyproject.toml": "tool = 5  # aim_llama: below\n"}, {},
     ["pyproject.toml: tool = 5 is not a table", "[tool.aim_llama] table"]),
    ("pyproject-table-not-a-table", {}, {"pyproject.toml": "[tool]\naim_llama = 'on'\n"}, {},
     ["pyproject.toml: tool.aim_llama = 'on' is not a table"]),
    ("writer-choice", {"AIM_LLAMA_WRITER": "fork"}, {}, {},
     ["writer", "env AIM_LLAMA_WRITER='fork'", "process or thread"]),
    ("run-params-reserved", {}, {"aim_llama.toml": "[run_params]\nllm_models = 5\n"}, {},
     ["run_params", "'llm_models' is aim-llama's own run parameter"]),
    ("env-unknown-prefix", {"AIM_LLAMA_REPO": "/tmp/x"}, {}, {},
     ["unknown environment variable AIM_LLAMA_REPO", "did you mean AIM_REPO?"]),
    ("env-unknown-typo", {"AIM_LLAMA_QUEUESIZE": "500"}, {}, {},
     ["unknown environment variable AIM_LLAMA_QUEUESIZE", "did you mean AIM_LLAMA_QUEUE_SIZE?",
      "aim-llama's variables: AIM_REPO, "]),
    ("pyproject-dash-table", {}, {"pyproject.toml": "[tool.aim-llama]\nqueue_size = 500\n"}, {},
     ["pyproject.toml: [tool.aim-llama] is not read", "[tool.aim_llama]"]),
    ("pyproject-syntax-in-our-table", {},
     {"pyproject.toml": "[tool.ruff]\nx = 1\n[tool.aim_llama]\nqueue_size = \n"}, {},
     ["pyproject.toml [tool.aim_llama] is not valid TOML", "line 4"]),
    ("kwarg-unknown", {}, {}, {"experimant": "x"},
     ["instrument(): unknown setting 'experimant'", "did you mean 'experiment'"]),
    ("kwarg-bad-type", {}, {}, {"system_tracking_interval": "x"},
     ["system_tracking_interval", "instrument(system_tracking_interval='x')"]),
]


def test_an_empty_unknown_variable_counts_as_unset(cwd: Path) -> None:
    """A compose file's blank `AIM_LLAMA_REPO=` (a typo, but empty) turned recording off: empty
    variables count as unset, as the README says; a set one is still an error."""
    loaded = load_settings({}, environ={"AIM_LLAMA_REPO": " ", "AIM_LLAMA_QUEUE_SIZE": "700"})
    assert loaded.settings.queue_size == 700
    with pytest.raises(ConfigError, match="unknown environment variable AIM_LLAMA_REPO"):
        load_settings({}, environ={"AIM_LLAMA_REPO": "/x"})


@pytest.mark.parametrize(
    ("env", "files", "overrides", "fragments"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_input_gives_one_clear_line(
    cwd: Path,
    env: dict[str, str],
    files: dict[str, str],
    overrides: dict[str, object],
    fragments: list[str],
) -> None:
    for name, text in files.items():
        (cwd / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(overrides, environ=env)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_the_bounds_themselves_are_allowed(cwd: Path) -> None:
    """The README's ranges are inclusive: a queue of 100 or 10,000,000 records, a flush timeout
    or tracking interval of a whole day."""
    for queue_size, seconds in (("100", "86400"), ("10000000", "86400.0")):
        loaded = load_settings(environ={"AIM_LLAMA_QUEUE_SIZE": queue_size,
                                        "AIM_LLAMA_FLUSH_TIMEOUT": seconds,
                                        "AIM_SYSTEM_TRACKING_INTERVAL": "86400"})
        assert loaded.settings.queue_size == int(queue_size)
        assert loaded.settings.flush_timeout == 86400.0
        assert loaded.settings.system_tracking_interval == 86400


def test_a_table_comes_whole_from_its_highest_source(cwd: Path) -> None:
    """`run_params` from instrument() replaces the file's table (no merging across sources), a
    pyproject table that is overridden is not validated, and `environ=` is the only environment."""
    (cwd / "pyproject.toml").write_text('[tool.aim_llama.run_params]\n"__bad" = 1\n')
    (cwd / "aim_llama.toml").write_text("queue_size = 300\n[run_params]\nteam = 'search'\n")
    loaded = load_settings({"run_params": {"x": 1}}, environ={})
    assert loaded.settings.run_params == {"x": 1}
    assert loaded.sources["run_params"] == "instrument()"
    from_file = load_settings(environ={})
    assert from_file.settings.run_params == {"team": "search"}
    assert from_file.sources["run_params"] == f"{Path.cwd() / 'aim_llama.toml'}: run_params"
    os.environ["AIM_LLAMA_QUEUE_SIZE"] = "400"  # the cwd fixture restores the environment
    try:
        assert load_settings(environ={}).settings.queue_size == 300
        assert load_settings().settings.queue_size == 400
    finally:
        del os.environ["AIM_LLAMA_QUEUE_SIZE"]


def test_a_deleted_working_directory_reads_no_files(cwd: Path) -> None:
    gone = cwd / "gone"
    gone.mkdir()
    os.chdir(gone)
    gone.rmdir()
    loaded = load_settings(environ={"AIM_EXPERIMENT": "e", "AIM_REPO": str(cwd / "r")})
    assert loaded.settings.experiment == "e" and loaded.sources["experiment"] == "env AIM_EXPERIMENT"
    # ... and the default repo, or a relative one, cannot be resolved: said at activation,
    # not at exit (validation alone passes: a strict process that never imports LlamaIndex
    # runs there)
    for env, where in (({}, "(default)"), ({"AIM_REPO": "runs"}, "(env AIM_REPO)")):
        loaded = load_settings(environ=env)
        with pytest.raises(ConfigError) as info:
            check_resolvable(loaded)
        message = str(info.value)
        assert message.startswith(f"invalid setting repo {where}: the working directory no "
                                  "longer exists"), message
        assert "set AIM_REPO to an absolute path" in message


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("sk-[a-z]{20,}", ["sk-[a-z]{20,}"]),
        ("sk-[a-z]{20,},ghp_\\w+", ["sk-[a-z]{20,}", "ghp_\\w+"]),
        ("[,;]x, (a,b)c", ["[,;]x", "(a,b)c"]),
        ("[]a,]b,c", ["[]a,]b", "c"]),
        ("a\\,b,c", ["a\\,b", "c"]),
        ("x{1,3}\ny", ["x{1,3}", "y"]),
    ],
)
def test_redact_patterns_split_on_commas_only_between_patterns(
        cwd: Path, text: str, patterns: list[str]) -> None:
    assert load_settings(environ={"AIM_LLAMA_REDACT": text}).settings.redact == patterns


def test_unreadable_file_as_a_bad_encoding(cwd: Path) -> None:
    """A file in another encoding is reported as such (not as a TOML syntax error to fix)."""
    (cwd / "aim_llama.toml").write_bytes(b"queue_size = 500\nexperiment = 'caf\xe9'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert str(info.value) == (f"{cwd / 'aim_llama.toml'} is not UTF-8 text (byte 0xe9 on line 2); "
                               "save it as UTF-8")


def test_a_huge_bad_value_is_cut_in_its_one_line(cwd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, environ={"AIM_LLAMA_QUEUE_SIZE": "9" * 3 + "z" * 20_000})
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    assert "AIM_LLAMA_QUEUE_SIZE='999zz" in message and "allowed:" in message


def test_a_labelled_file_is_named_by_its_full_path(cwd: Path) -> None:
    """A program that changes directory may read another directory's file: the error says which."""
    (cwd / "aim_llama.toml").write_text("queue_size = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert f"({Path.cwd() / 'aim_llama.toml'}: queue_size = 5)" in str(info.value)


def test_another_tools_broken_section_is_not_ours_to_judge(cwd: Path) -> None:
    """pyproject.toml that depends on aim-llama but has a syntax error in [tool.ruff]: ignored,
    not blamed on [tool.aim_llama]; the same file fixed is read as usual."""
    broken = '[project]\nname = "app"\ndependencies = ["aim-llama>=0.1"]\n[tool.ruff]\nline-length = \n'
    (cwd / "pyproject.toml").write_text(broken)
    assert load_settings(environ={}).settings.queue_size == 50_000
    (cwd / "pyproject.toml").write_text(broken.replace("line-length = ", "line-length = 99")
                                        + "[tool.aim_llama]\nqueue_size = 700\n")
    assert load_settings(environ={}).settings.queue_size == 700


def test_a_byte_order_mark_is_read_past(cwd: Path) -> None:
    (cwd / "aim_llama.toml").write_bytes(b"\xef\xbb\xbfqueue_size = 500\n")
    assert load_settings(environ={}).settings.queue_size == 500


def test_a_config_file_beyond_the_size_read_is_an_error_not_a_cut(cwd: Path) -> None:
    (cwd / "aim_llama.toml").write_bytes(b"#" * 99 + b"\n" + (b"#" * 99 + b"\n") * 40_000
                                         + b"queue_size = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert "larger than 4 MB" in str(info.value) and "aim_llama.toml" in str(info.value)


@pytest.mark.parametrize(("line", "expected"), [("strict = true", True), ("enabled = false", False)])
def test_switches_count_in_a_file_with_a_syntax_error(cwd: Path, line: str, expected: bool) -> None:
    """Strict mode and the kill switch are known even when another line breaks the TOML."""
    from aim_llama.switches import switch

    (cwd / "aim_llama.toml").write_text(f"{line}  # on purpose\nqueue_size = \n")
    assert switch(line.split()[0], {}) is expected
    (cwd / "pyproject.toml").write_text(f"[tool.aim_llama]\n{line}\nqueue_size = \n")
    (cwd / "aim_llama.toml").unlink()
    assert switch(line.split()[0], {}) is expected


def test_a_broken_other_table_beside_ours_is_not_ours_to_judge(cwd: Path) -> None:
    (cwd / "pyproject.toml").write_text(
        "[project]\nname = 'app'\n[tool.aim_llama]\nqueue_size = 700\n[tool.ruff]\nline-length =\n")
    assert load_settings(environ={}).settings.queue_size == 700


@pytest.mark.parametrize(
    ("env", "files", "secret", "kept"),
    [
        ({"AIM_REPO": "aim://admin:hunter2secret@tracking:53800"}, {}, "hunter2secret",
         "env AIM_REPO='aim://admin:***@tracking:53800'"),
        ({"AIM_RUN_PARAMS": '{"openai_api_key":"sk-proj-abcdefghijklmnopqrstuvwx","__x":1}'}, {},
         "abcdefghijklmnop", "key '__x' is not allowed"),
        ({"AIM_RUN_PARAMS": '{"db_password":"plain-words","__x":1}'}, {}, "plain-words",
         '"db_password":***'),
        ({"AIM_RUN_PARAMS": '{"note":"ghp_' + "a" * 36 + '","__x":1}'}, {}, "a" * 20, '"note":"***"'),
        ({}, {"aim_llama.toml": '[run_params]\nauth_token = "t0psecret"\n__x = 1\n'}, "t0psecret",
         "run_params = {'auth_token': ***, '__x': 1}"),
        ({}, {"aim_llama.toml": 'repo = "aim://u:pw-in-file@h:1:2"\n'}, "pw-in-file", "'aim://u:***@h"),
        # passwords with `/` (base64), `'`, `@`, without a user, and one a cut would split
        ({"AIM_REPO": "aim://admin:Zm9v/YmFyX2Jheg@tracking:53800"}, {}, "YmFyX2Jheg",
         "'aim://admin:***@tracking:53800'"),
        ({"AIM_REPO": "aim://:tok3nSecret@tracking:53800"}, {}, "tok3nSecret", "aim://:***@"),
        ({"AIM_REPO": "aim://admin:pa'ss@tracking:53800"}, {}, "ss@", "aim://admin:***@"),
        ({"AIM_REPO": "aim://admin:p@ssw0rd@tracking:53800"}, {}, "ssw0rd", "aim://admin:***@"),
        ({"AIM_REPO": "aim://administrator-account:SuperSecretPassword123456789@tracking.example"
                      ".com:53800"}, {}, "SuperSecret", "aim://administrator-account:***@"),
        ({"AIM_RUN_PARAMS": '{"__x": 1, "model": "gpt-4o", "note": "sk-proj-ABCDEFGHIJKLMNOPQRSTUV'
                            'WXYZ0123456789"}'}, {}, "ABCDEFGHI", "key '__x' is not allowed"),
    ],
    ids=["url-password", "openai-key-under-key-name", "secret-key-name", "github-token-value",
         "toml-table", "toml-url", "slash", "no-user", "quote", "at", "long", "cut-token"],
)
def test_config_errors_mask_the_secrets_they_quote(
        cwd: Path, env: dict[str, str], files: dict[str, str], secret: str, kept: str) -> None:
    for name, text in files.items():
        (cwd / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    message = str(info.value)
    assert secret not in message and secret not in str(info.value.source), message
    assert kept in message, message


def test_config_errors_keep_what_only_looks_like_a_secret(cwd: Path) -> None:
    """Whole words make a key secret: `max_tokens` and `author` are not; and a `redact`
    pattern is the user's own regex, shown as written."""
    (cwd / "aim_llama.toml").write_text(
        '[run_params]\nmax_tokens = 512\nauthor = "Jane"\napi_key = "k"\n__x = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert "{'max_tokens': 512, 'author': 'Jane', 'api_key': ***," in str(info.value)
    (cwd / "aim_llama.toml").unlink()
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"AIM_LLAMA_REDACT": '"password": "[^"]*", (unclosed'})
    assert '"password": "[^"]*"' in str(info.value), str(info.value)


def test_secret_names_are_told_by_their_words_and_masking_a_long_value_is_quick() -> None:
    import time

    from aim_llama.errors import mask_secrets, secret_name

    secret = ["api_key", "OPENAI_API_KEY", "OPENAIAPIKEY", "githubToken", "X-Auth-Token",
              "Authorization", "authtoken", "accesstoken", "secretkey", "privatekey", "db_pass",
              "db-password", "pwd", "token", "passphrase", "api_tokens", "ssh_keys",
              "connection_string", "dsn", "sig", "webhook_url", "session_id", "new_token",
              "input_token", "api_token_per_user", "hftoken", "access_tokens", "signing_keys",
              "keys", "openai_keys", "slack_tokens", "tokens", "authkey", "privkey", "pw",
              "passcode", "creds", "GITHUB_PAT", "API Key"]
    plain = ["max_tokens", "tokens_used", "token_count", "prompt_tokens", "tokenizer", "author",
             "monkey", "model", "temperature", "bypass", "keyword", "passthrough",
             "chunk_size_tokens", "cached_tokens"]
    assert [n for n in secret if not secret_name(n)] == []
    assert [n for n in plain if secret_name(n)] == []
    # a URL's password, whatever it holds (`,` `/` `'` `@`, 300 characters), up to the last
    # `@` of its word (two URLs joined by a comma: the first host goes too, the safe side)
    for password in ("pa,ss", "p//w", "pa'ss", "p@ss", "p" * 300, "123456", "1234/5"):
        assert mask_secrets(f"x aim://user:{password}@host:53800 y") == \
            "x aim://user:***@host:53800 y", password
    assert "p@" not in mask_secrets("'aim://u:p@h1/x,aim://v:q@h2'")
    # (a URL with a port and a path first in the word does not shield a later one)
    assert "hunter2" not in mask_secrets('{"a":"http://localhost:5432/db","b":"pg://u:hunter2@h"}')
    for plain_text in ("aim://host:53800 or user@example.com", "git@github.com:x/y.git",
                       "https://registry.npmjs.org:443/@types/node"):
        assert mask_secrets(plain_text) == plain_text
    # a secret name's value whole, a list or a table too; a quoted NAME=VALUE whatever it holds
    for text, secret in (('{"api_keys":["k1-hunter2","k2"],}', "hunter2"),
                         ('{"token":{"value":"hunter2"},}', "hunter2"),
                         ('{"API Key":"hunter2",}', "hunter2"),
                         ("--set \"api_key=it's-hunter2\": expected", "hunter2"),
                         ("--set 'API KEY=hunter2': expected", "hunter2")):
        assert secret not in mask_secrets(text), text
    assert mask_secrets("--set 'max_tokens=5': expected") == "--set 'max_tokens=5': expected"
    # bounded: a long value of URL-like pieces was quadratic (128 KB: 6.8 s)
    started = time.perf_counter()
    mask_secrets("aim://h:" + "//a:" * 32_000 + "@x")
    assert time.perf_counter() - started < 3


def test_messages_escape_line_breaks_but_keep_every_other_character_readable() -> None:
    from aim_llama.errors import one_line

    assert one_line("/tmp/新\u3000フォルダ/caf\u00e9\u00a0x\u202fy.toml") == \
        "/tmp/新\u3000フォルダ/caf\u00e9\u00a0x\u202fy.toml"
    assert one_line("a\nb\r\tc\x85d\u2028e") == "a\\nb\\r\\tc\\x85d\\u2028e"


def test_a_link_to_dev_null_by_the_default_name_is_an_empty_file(cwd: Path) -> None:
    """Only what could block (a FIFO, a terminal) is refused by the default name: the null
    device reads as empty at once."""
    (cwd / "aim_llama.toml").symlink_to(os.devnull)
    loaded = load_settings(environ={})
    assert loaded.settings.queue_size == AimLlamaSettings().queue_size


@pytest.mark.parametrize(("target", "said"), [("nothere.toml", "is a symlink to 'nothere.toml', "
                                               "which does not exist"),
                                              ("aim_llama.toml", "is a symlink loop")])
def test_a_link_leading_nowhere_is_an_error_like_a_directory(cwd: Path, target: str,
                                                             said: str) -> None:
    """Named like the default file it is an error (not silently no settings); named by
    AIM_LLAMA_CONFIG, it says what it is rather than "does not exist"."""
    (cwd / "aim_llama.toml").symlink_to(target)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={})
    assert str(info.value).startswith(f"{str(cwd / 'aim_llama.toml')!r} {said}, but aim-llama "
                                      "reads its settings from a TOML file"), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"AIM_LLAMA_CONFIG": "aim_llama.toml"})
    assert f"aim_llama.toml' {said} (named by env AIM_LLAMA_CONFIG)" in str(info.value)


def test_a_blank_switch_variable_counts_as_unset(cwd: Path) -> None:
    """README: an empty (or all-blank) environment variable counts as unset — so the file's
    kill switch still wins (over a broken configuration too)."""
    from aim_llama.switches import switch

    (cwd / "aim_llama.toml").write_text("enabled = false\nqueue_size = 'abc'\n")
    for blank in ("", "  ", "\t"):
        assert switch("enabled", {"AIM_LLAMA_ENABLED": blank}) is False, repr(blank)


def test_the_switches_follow_the_file_precedence(cwd: Path) -> None:
    """README: the TOML file > `[tool.aim_llama]` in pyproject.toml, for the switches too."""
    from aim_llama.switches import switch

    (cwd / "aim_llama.toml").write_text("enabled = true\nstrict = false\n")
    (cwd / "pyproject.toml").write_text("[tool.aim_llama]\nenabled = false\nstrict = true\n")
    assert switch("enabled", {}) is True and switch("strict", {}) is False
    assert switch("strict", {}, quick=True) is False


def test_another_tools_strict_line_is_not_ours_in_a_broken_file(cwd: Path) -> None:
    """A plain `strict = true` line counts in a file TOML cannot parse only in aim-llama's own
    table: mypy's `[tool.mypy] strict = true` beside a broken `[tool.aim_llama]` is not strict
    mode (which would stop every Python process at start-up)."""
    from aim_llama.switches import switch

    (cwd / "pyproject.toml").write_text(
        "[tool.mypy]\nstrict = true\n[tool.aim_llama]\nqueue_size =\n")
    assert switch("strict", {}) is None
    assert switch("strict", {}, quick=True) is None


def test_a_line_separator_alone_is_escaped_in_messages() -> None:
    """Every message and source stays one line: U+2028 / U+2029 (which `str.splitlines` and
    many viewers break at) are escaped even in a text with no other control character."""
    from aim_llama.errors import ConfigError, one_line

    assert one_line("a\u2028b") == "a\\u2028b"
    assert one_line("a\u2029b") == "a\\u2029b"
    exc = ConfigError("invalid setting experiment (env AIM_EXPERIMENT='x\u2028y')")
    assert len(str(exc).splitlines()) == 1


def test_redact_secrets_false_turns_off_the_built_ins_but_keeps_redact(cwd: Path) -> None:
    key = "sk-" + "a1B2" * 8
    settings = load_settings(environ={"AIM_LLAMA_REDACT_SECRETS": "false",
                                      "AIM_LLAMA_REDACT": r"\d{3}-\d{2}-\d{4}"}).settings
    from aim_llama.content import ContentPolicy

    policy = ContentPolicy.from_settings(settings)
    assert policy.redact(f"{key} ssn 123-45-6789") == f"{key} ssn [REDACTED]"


def test_an_all_blank_environment_variable_counts_as_unset(cwd: Path) -> None:
    loaded = load_settings(environ={"AIM_LLAMA_QUEUE_SIZE": "   ", "AIM_LLAMA_SAMPLE_RATE": "\t"})
    assert loaded.settings.queue_size == 50_000 and loaded.settings.sample_rate == 1.0
    assert loaded.sources["queue_size"] == "default"


@pytest.mark.parametrize(("word", "value"), [("true", True), ("yes", True), ("on", True),
                                             ("1", True), ("false", False), ("no", False),
                                             ("off", False), ("0", False)])
def test_every_boolean_spelling_the_error_line_allows_is_accepted(
        cwd: Path, word: str, value: bool) -> None:
    """Every boolean's error says `true or false (also yes/no, on/off, 1/0)`."""
    s = load_settings(environ={"AIM_LLAMA_CAPTURE_CONTENT": word,
                               "AIM_LLAMA_REDACT_SECRETS": word.upper()}).settings
    assert s.capture_content is value and s.redact_secrets is value


@pytest.mark.parametrize(("env", "allowed"), [
    ({"AIM_LLAMA_SAMPLE_RATE": "2"}, "allowed: a number from 0 to 1"),
    ({"AIM_LLAMA_QUEUE_SIZE": "5"}, "allowed: a whole number of records from 100 to 10000000"),
    ({"AIM_LLAMA_FLUSH_TIMEOUT": "0"}, "allowed: a number of seconds > 0 and <= 86400"),
    ({"AIM_LLAMA_MAX_TEXT_LENGTH": "-3"}, "none/off/0 for no limit"),
    ({"AIM_LLAMA_CAPTURE_CONTENT": "maybe"}, "allowed: true or false"),
    ({"AIM_LLAMA_PROPAGATE": "maybe"}, "allowed: true or false"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_every_setting_error_says_what_is_allowed(cwd: Path, env: dict[str, str],
                                                  allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert allowed in str(info.value), str(info.value)


def test_an_invalid_redact_pattern_is_named_even_in_a_long_list(cwd: Path) -> None:
    """README: an invalid regex is a configuration error naming it (the value quoted in the
    source part is cut at 60 characters, so the message itself must name it)."""
    good = [f"customer-id-{i}-[0-9]{{8}}" for i in range(5)]
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"AIM_LLAMA_REDACT": "\n".join([*good, "broken(group"])})
    assert "'broken(group'" in str(info.value), str(info.value)


def test_an_auth_word_makes_a_name_secret() -> None:
    """README: a word such as `auth` makes a key's value secret (`basic_auth`)."""
    assert secret_name("basic_auth") and secret_name("proxy-auth")
    assert "hunter2" not in mask_secrets('{"basic_auth": "user:hunter2"}')
