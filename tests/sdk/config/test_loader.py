import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fedsilo.sdk.config import (
    ConfigError,
    config_keys,
    config_to_dict,
    dump_toml,
    load_config,
    unmatched_env_vars,
)

PASSWORD = "s3cr3t-PW-9871"
TOKEN = "tok-ABCDEF-123456"


@dataclass(frozen=True)
class BrokerSection:
    urls: tuple[str, ...] = field(default=("amqp://guest:guest@127.0.0.1:5672/",),
                                  metadata={"secret": "url"})
    chunk_size: int = 4 * 2**20
    password_file: Path | None = None
    token: str = field(default="", metadata={"secret": True})


@dataclass(frozen=True)
class RoundsSection:
    deadline_s: float = 600.0
    quorum: float = 1.0
    on_missing: Literal["extend", "abort"] = "extend"
    early_stop: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")


@dataclass(frozen=True)
class SiloEntry:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class FederationConfig:
    name: str = "demo"
    silos: tuple[str, ...] = ()
    broker: BrokerSection = field(default_factory=BrokerSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    extra: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    note: str | None = None
    max_rounds: int | None = None
    members: tuple[SiloEntry, ...] = ()


def write(tmp_path: Path, text: str, name: str = "federation.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(FederationConfig, *args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- basics -----------------------------------------------------------------------------------

def test_defaults_when_no_file_env_or_overrides() -> None:
    assert load_config(FederationConfig, env={}) == FederationConfig()


def test_file_values_nested_tables_and_collections(tmp_path: Path) -> None:
    path = write(tmp_path, """
name = "fed"
silos = ["a", "b"]
tags = ["x"]
[broker]
chunk_size = 1024
[rounds]
deadline_s = 30
on_missing = "abort"
early_stop = true
[extra]
lr = 0.5
mu = 1
""")
    cfg = load_config(FederationConfig, path, env={})
    assert cfg.name == "fed"
    assert cfg.silos == ("a", "b") and isinstance(cfg.silos, tuple)
    assert cfg.tags == ["x"] and isinstance(cfg.tags, list)
    assert cfg.broker.chunk_size == 1024
    assert cfg.broker.urls == BrokerSection().urls  # untouched key keeps its default
    assert cfg.rounds == RoundsSection(deadline_s=30.0, on_missing="abort", early_stop=True)
    assert cfg.extra == {"lr": 0.5, "mu": 1.0}
    assert all(isinstance(v, float) for v in cfg.extra.values())


def test_array_of_tables_builds_nested_dataclasses(tmp_path: Path) -> None:
    path = write(tmp_path, '[[members]]\nname = "a"\n[[members]]\nname = "b"\nweight = 2\n')
    cfg = load_config(FederationConfig, path, env={})
    assert cfg.members == (SiloEntry("a"), SiloEntry("b", 2.0))


def test_array_of_tables_errors_name_the_element(tmp_path: Path) -> None:
    path = write(tmp_path, '[[members]]\nweight = "x"\nnmae = "a"\n')
    msg = error_of(path, env={})
    assert 'unknown key "members[0].nmae"; did you mean "members[0].name"?' in msg
    assert "members[0].weight: expected float" in msg
    assert 'missing required key "members[0].name"' in msg


def test_not_a_dataclass_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        load_config(dict, env={})  # type: ignore[type-var]


def test_required_key_missing() -> None:
    @dataclass(frozen=True)
    class Needs:
        name: str
        port: int = 1

    with pytest.raises(ConfigError, match='missing required key "name" \\(str\\)'):
        load_config(Needs, env={})
    assert load_config(Needs, env={"FEDSILO_NAME": "x"}) == Needs("x")


# --- unknown keys and collected problems ------------------------------------------------------

def test_unknown_top_level_key_suggests_and_lists_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, 'nmae = "x"\n')
    msg = error_of(path, env={})
    assert msg.startswith(f'{path}: unknown key "nmae"; did you mean "name"? '
                          "allowed keys at the top level: name, silos, broker, rounds")


def test_unknown_nested_key_suggests_and_lists_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "[rounds]\ndedline_s = 3\n")
    assert error_of(path, env={}) == (
        f'{path}: unknown key "rounds.dedline_s"; did you mean "rounds.deadline_s"? '
        "allowed keys in [rounds]: deadline_s, quorum, on_missing, early_stop")


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "[rounds]\nzzz = 1\n"), env={})
    assert "did you mean" not in msg and 'unknown key "rounds.zzz"; allowed keys in' in msg


def test_all_problems_of_a_file_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, """
nmae = "x"
silos = "a"
[rounds]
dedline_s = 3
on_missing = "wait"
early_stop = 1
""")
    with pytest.raises(ConfigError) as info:
        load_config(FederationConfig, path, env={})
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert str(info.value).splitlines() == problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    joined = "\n".join(problems)
    for part in ('"nmae"', "silos: expected tuple[str, ...]", '"rounds.dedline_s"',
                 'rounds.on_missing = "wait"', "rounds.early_stop: expected bool"):
        assert part in joined


def test_problems_from_file_env_and_set_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[rounds]\nquorum = \"high\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(FederationConfig, path, env={"FEDSILO_ROUNDS__DEADLINE_S": "soon"},
                    overrides=["broker.chunk_size=big"])
    labels = [p.split(":")[0] for p in info.value.problems]
    assert labels == [str(path), "FEDSILO_ROUNDS__DEADLINE_S", "--set broker.chunk_size"]


# --- types ------------------------------------------------------------------------------------

def test_wrong_type_names_expected_type_and_received_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[rounds]\ndeadline_s = "soon"\n[broker]\nchunk_size = [1]\n')
    msg = error_of(path, env={})
    assert f'{path}: rounds.deadline_s: expected float, got "soon" (string)' in msg
    assert "broker.chunk_size: expected int, got [1] (array)" in msg


def test_section_given_a_scalar(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "rounds = 3\n"), env={})
    assert "rounds: expected RoundsSection, got 3 (integer)" in msg


def test_literal_error_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, '[rounds]\non_missing = "wait"\n')
    assert error_of(path, env={}) == (
        f'{path}: rounds.on_missing = "wait" is not allowed; use one of "extend", "abort"')


def test_bool_is_strict_both_ways(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "[rounds]\nearly_stop = 1\n"), env={})
    assert "rounds.early_stop: expected bool, got 1 (integer)" in msg
    msg = error_of(write(tmp_path, "[broker]\nchunk_size = true\n"), env={})
    assert "broker.chunk_size: expected int, got true (boolean)" in msg
    msg = error_of(env={}, overrides=["rounds.early_stop=yes"])
    assert 'expected bool, got "yes" (string)' in msg


def test_int_is_accepted_for_float_but_float_not_for_int(tmp_path: Path) -> None:
    cfg = load_config(FederationConfig, write(tmp_path, "[rounds]\ndeadline_s = 5\n"), env={})
    assert cfg.rounds.deadline_s == 5.0 and isinstance(cfg.rounds.deadline_s, float)
    msg = error_of(write(tmp_path, "[broker]\nchunk_size = 2.0\n"), env={})
    assert "broker.chunk_size: expected int, got 2.0 (float)" in msg


def test_tuple_elements_are_type_checked(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, 'silos = ["a", 2]\n'), env={})
    assert "silos[1]: expected str, got 2 (integer)" in msg


def test_dict_values_are_type_checked(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, '[extra]\nlr = "fast"\n'), env={})
    assert 'extra.lr: expected float, got "fast" (string)' in msg


def test_dict_table_replaces_but_dotted_key_merges(tmp_path: Path) -> None:
    path = write(tmp_path, "[extra]\na = 1\n")
    cfg = load_config(FederationConfig, path, env={"FEDSILO_EXTRA__B": "2"},
                      overrides=["extra.c=3"])
    assert cfg.extra == {"a": 1.0, "b": 2.0, "c": 3.0}
    cfg = load_config(FederationConfig, path, env={}, overrides=["extra={z = 9}"])
    assert cfg.extra == {"z": 9.0}


def test_path_relative_to_file_folder_and_home_expanded(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", '[broker]\npassword_file = "secrets/pw.txt"\n')
    monkeypatch.chdir(tmp_path)  # not the file's folder
    cfg = load_config(FederationConfig, "conf/federation.toml", env={})
    assert cfg.broker.password_file == path.parent / "secrets" / "pw.txt"
    assert cfg.broker.password_file.is_absolute()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path.write_text('[broker]\npassword_file = "~/pw.txt"\n')
    cfg = load_config(FederationConfig, path, env={})
    assert cfg.broker.password_file == tmp_path / "home" / "pw.txt"


def test_path_from_env_and_set_is_relative_to_cwd(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(FederationConfig, env={"FEDSILO_BROKER__PASSWORD_FILE": "pw.txt"})
    assert cfg.broker.password_file == tmp_path / "pw.txt"
    cfg = load_config(FederationConfig, env={}, overrides=["broker.password_file=/abs/pw"])
    assert cfg.broker.password_file == Path("/abs/pw")


def test_empty_string_means_none_only_where_empty_is_not_a_valid_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[broker]\npassword_file = "pw"\n')
    cfg = load_config(FederationConfig, path, env={"FEDSILO_BROKER__PASSWORD_FILE": ""})
    assert cfg.broker.password_file is None  # Path | None: "" unsets
    cfg = load_config(FederationConfig, env={}, overrides=["max_rounds=", "note="])
    assert cfg.max_rounds is None  # int | None: "" is no int, so None
    assert cfg.note == ""  # str | None: "" is a valid str and stays one
    cfg = load_config(FederationConfig, write(tmp_path, 'max_rounds = ""\n'), env={})
    assert cfg.max_rounds is None


def test_plain_path_rejects_empty_string() -> None:
    @dataclass(frozen=True)
    class P:
        data: Path = Path("data")

    with pytest.raises(ConfigError, match="data: expected a non-empty path string"):
        load_config(P, env={}, overrides=["data="])


# --- environment and overrides ----------------------------------------------------------------

def test_env_nesting_and_precedence_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "file"\n[rounds]\ndeadline_s = 10\nquorum = 0.5\n')
    env = {"FEDSILO_ROUNDS__DEADLINE_S": "30", "FEDSILO_NAME": "from-env",
           "FEDSILO_SILOS": '["a", "b"]', "OTHER_NAME": "ignored"}
    cfg = load_config(FederationConfig, path, env=env)
    assert cfg.rounds.deadline_s == 30.0
    assert cfg.rounds.quorum == 0.5  # the file still counts where env says nothing
    assert cfg.name == "from-env" and cfg.silos == ("a", "b")


def test_env_names_are_case_insensitive_and_prefix_is_configurable() -> None:
    cfg = load_config(FederationConfig, env={"APP_rounds__Quorum": "0.25", "FEDSILO_NAME": "x"},
                      env_prefix="APP_")
    assert cfg.rounds.quorum == 0.25 and cfg.name == "demo"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSILO_ROUNDS__QUORUM", "0.75")
    assert load_config(FederationConfig).rounds.quorum == 0.75


def test_unmatched_env_vars_are_ignored_and_listed_at_debug(caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    env = {"FEDSILO_REQUIRE_BROKER": "1", "FEDSILO_ROUNDS__DEDLINE_S": "3",
           "FEDSILO_NAME__X": "y", "FEDSILO_NAME": "ok"}
    with caplog.at_level(logging.DEBUG, logger="fedsilo.sdk.config.loader"):
        cfg = load_config(FederationConfig, env=env)
    assert cfg.name == "ok"
    assert unmatched_env_vars(FederationConfig, env) == [
        "FEDSILO_NAME__X", "FEDSILO_REQUIRE_BROKER", "FEDSILO_ROUNDS__DEDLINE_S"]
    assert "FEDSILO_REQUIRE_BROKER" in caplog.text and "FEDSILO_ROUNDS__DEDLINE_S" in caplog.text
    assert "FEDSILO_NAME," not in caplog.text


def test_set_override_wins_over_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[rounds]\nquorum = 0.5\n")
    cfg = load_config(FederationConfig, path, env={"FEDSILO_ROUNDS__QUORUM": "0.6"},
                      overrides=["rounds.quorum=0.7", "rounds.on_missing=abort"])
    assert cfg.rounds.quorum == 0.7 and cfg.rounds.on_missing == "abort"
    cfg = load_config(FederationConfig, path, env={"FEDSILO_ROUNDS__QUORUM": "0.6"},
                      overrides=["rounds.quorum=0.7", "rounds.quorum=0.8"])
    assert cfg.rounds.quorum == 0.8  # the last --set wins


def test_set_accepts_an_inline_table_for_a_section() -> None:
    cfg = load_config(FederationConfig, env={},
                      overrides=['rounds={quorum = 0.5, on_missing = "abort"}'])
    assert cfg.rounds == RoundsSection(quorum=0.5, on_missing="abort")


def test_values_that_are_not_toml_become_strings() -> None:
    cfg = load_config(FederationConfig, env={"FEDSILO_NAME": "my federation"},
                      overrides=["broker.urls=[\"amqp://h/\"]", "tags=[\"a\", \"b\"]"])
    assert cfg.name == "my federation"
    assert cfg.broker.urls == ("amqp://h/",) and cfg.tags == ["a", "b"]
    # parses as TOML (an integer, a date) but the field is a str: the raw text is kept
    cfg = load_config(FederationConfig, env={"FEDSILO_NAME": "123"}, overrides=["note=2024-01-01"])
    assert cfg.name == "123" and cfg.note == "2024-01-01"
    cfg = load_config(FederationConfig, env={}, overrides=['name="quoted"', "note=a=b"])
    assert cfg.name == "quoted" and cfg.note == "a=b"
    # text that parses as a TOML document with more keys than the value is still one string
    cfg = load_config(FederationConfig, env={"FEDSILO_NOTE": "1\nx = 2"})
    assert cfg.note == "1\nx = 2"


def test_bad_set_flags(tmp_path: Path) -> None:
    msg = error_of(env={}, overrides=["rounds.quorum", "rounds.dedline_s=3", "name.x=1", "a..b=1"])
    lines = msg.splitlines()
    assert lines[0] == "--set 'rounds.quorum': expected dotted.key=value"
    assert lines[1].startswith('--set rounds.dedline_s: unknown key "rounds.dedline_s"; '
                               'did you mean "rounds.deadline_s"?')
    assert lines[2] == '--set name.x: "name" is not a table, so "name.x" is no key'
    assert "empty key part" in lines[3]


def test_env_value_errors_name_the_variable() -> None:
    msg = error_of(env={"FEDSILO_ROUNDS__ON_MISSING": "wait"})
    assert msg == ('FEDSILO_ROUNDS__ON_MISSING: rounds.on_missing = "wait" is not allowed; '
                   'use one of "extend", "abort"')


# --- __post_init__, files ---------------------------------------------------------------------

def test_post_init_error_is_wrapped_with_section_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "[rounds]\nquorum = 2\n")
    msg = error_of(path, env={"FEDSILO_ROUNDS__DEADLINE_S": "5"})
    # the check names quorum, so only the source that set quorum is blamed (issue 16)
    assert msg == f"{path}: [rounds] is invalid: quorum must be in (0, 1], got 2.0"


def test_post_init_of_the_top_level_class() -> None:
    @dataclass(frozen=True)
    class Top:
        a: int = 1
        b: int = 2

        def __post_init__(self) -> None:
            if self.a > self.b:
                raise ValueError("a must not exceed b")

    with pytest.raises(ConfigError) as info:
        load_config(Top, env={}, overrides=["a=5"])
    assert str(info.value) == "--set a: the top-level table is invalid: a must not exceed b"


def test_missing_file_says_where_and_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    msg = error_of(path, env={})
    assert msg.startswith(f"{path}: config file not found")
    assert "create it as a TOML file holding only the keys to change" in msg
    assert "[rounds]" in msg


def test_invalid_toml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "x"\n[rounds\n')
    msg = error_of(path, env={})
    assert msg.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in msg and "column" in msg


# --- secrets, dumping, keys -------------------------------------------------------------------

SECRET_URL = f"amqp://fed:{PASSWORD}@broker.example:5672/vhost"


def test_url_secrets_mask_only_the_password_in_dict_and_toml() -> None:
    cfg = load_config(FederationConfig, env={"FEDSILO_BROKER__URLS": f'["{SECRET_URL}"]',
                                             "FEDSILO_BROKER__TOKEN": TOKEN})
    assert cfg.broker.urls == (SECRET_URL,) and cfg.broker.token == TOKEN
    shown = config_to_dict(cfg)
    assert shown["broker"]["urls"] == ["amqp://fed:***@broker.example:5672/vhost"]
    assert shown["broker"]["token"] == "***"
    text = dump_toml(cfg)
    assert PASSWORD not in text and TOKEN not in text and PASSWORD not in str(shown)
    assert "amqp://fed:***@broker.example:5672/vhost" in text
    raw = config_to_dict(cfg, redact=False)
    assert raw["broker"]["urls"] == [SECRET_URL] and raw["broker"]["token"] == TOKEN


def test_secret_values_never_appear_in_error_messages(tmp_path: Path) -> None:
    path = write(tmp_path, f'[broker]\nurls = "{SECRET_URL}"\ntoken = ["{TOKEN}"]\n')
    msg = error_of(path, env={"FEDSILO_BROKER__URLS": SECRET_URL},
                   overrides=[f"broker.token={{x = \"{TOKEN}\"}}", f"broker.tokn={TOKEN}"])
    assert PASSWORD not in msg and TOKEN not in msg
    assert "broker.urls: expected tuple[str, ...], got a string (secret, not shown)" in msg
    assert "broker.token: expected str, got an array (secret, not shown)" in msg


def test_secret_values_never_appear_in_wrapped_post_init_errors() -> None:
    @dataclass(frozen=True)
    class Leaky:
        url: str = field(default="amqp://h/", metadata={"secret": "url"})
        key: str = field(default="k", metadata={"secret": True})

        def __post_init__(self) -> None:
            if not self.url.startswith("amqps://"):
                raise ValueError(f"insecure url {self.url} with key {self.key}")

    with pytest.raises(ConfigError) as info:
        load_config(Leaky, env={"FEDSILO_URL": SECRET_URL, "FEDSILO_KEY": TOKEN})
    msg = str(info.value)
    assert PASSWORD not in msg and TOKEN not in msg
    assert "insecure url amqp://fed:***@broker.example:5672/vhost with key ***" in msg


def test_secret_literal_error_does_not_echo_the_value() -> None:
    @dataclass(frozen=True)
    class Mode:
        mode: Literal["a", "b"] = field(default="a", metadata={"secret": True})

    with pytest.raises(ConfigError) as info:
        load_config(Mode, env={}, overrides=[f"mode={TOKEN}"])
    assert TOKEN not in str(info.value) and 'use one of "a", "b"' in str(info.value)


def test_dump_toml_is_valid_toml_and_round_trips_unredacted(tmp_path: Path) -> None:
    cfg = FederationConfig(
        name='we "quote"\tand\x7f', silos=("a", "b"), extra={"lr": 0.5, "odd key": 1.0},
        broker=BrokerSection(urls=(SECRET_URL,), password_file=tmp_path / "pw", token=TOKEN),
        rounds=RoundsSection(deadline_s=float("inf"), on_missing="abort"),
        members=(SiloEntry("a"), SiloEntry("b", 2.0)), max_rounds=3,
    )
    text = dump_toml(cfg, redact=False)
    tomllib.loads(text)
    assert load_config(FederationConfig, write(tmp_path, text), env={}) == cfg
    assert "# note: not set" in text
    redacted = dump_toml(cfg)
    assert PASSWORD not in redacted and TOKEN not in redacted
    assert tomllib.loads(redacted)["broker"]["token"] == "***"


def test_config_to_dict_is_plain_data(tmp_path: Path) -> None:
    cfg = FederationConfig(silos=("a",), broker=BrokerSection(password_file=tmp_path / "pw"))
    shown = config_to_dict(cfg)
    assert shown["silos"] == ["a"] and shown["broker"]["password_file"] == str(tmp_path / "pw")
    assert shown["note"] is None and shown["extra"] == {}
    assert shown["broker"]["urls"] == ["amqp://guest:***@127.0.0.1:5672/"]


def test_config_keys_lists_every_dotted_key_with_type_and_default() -> None:
    keys = config_keys(FederationConfig)
    assert keys[:2] == ['name: str = "demo"', "silos: tuple[str, ...] = []"]
    assert 'broker.urls: tuple[str, ...] = ["amqp://guest:***@127.0.0.1:5672/"]' in keys
    assert "broker.password_file: Path | None = (unset)" in keys
    assert 'broker.token: str = "***"' in keys
    assert 'rounds.on_missing: "extend" | "abort" = "extend"' in keys
    assert "rounds.deadline_s: float = 600.0" in keys
    assert "extra: dict[str, float] = {}" in keys
    assert "members: tuple[SiloEntry, ...] = []" in keys
    assert len(keys) == 15


def test_config_keys_uses_a_parents_default_instance_and_marks_required() -> None:
    @dataclass(frozen=True)
    class Inner:
        port: int
        host: str = "h"

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = field(default_factory=lambda: Inner(port=5))
        named: dict[str, Inner] = field(default_factory=dict)

    assert config_keys(Outer) == ["inner.port: int = 5", 'inner.host: str = "h"',
                                  "named.<name>.port: int (required)",
                                  'named.<name>.host: str = "h"']
    cfg = load_config(Outer, env={}, overrides=["inner.host=x", "named.a.port=1"])
    assert cfg == Outer(inner=Inner(port=5, host="x"), named={"a": Inner(port=1)})
