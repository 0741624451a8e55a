"""Which source an error blames, what a missing file reports, and how names-or-paths
values resolve (sdk/config/loader.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedsilo.sdk.config import ConfigError, NamesOrPaths, dump_toml, load_config


@dataclass(frozen=True)
class Inner:
    name: str = "a"
    size: int = 1


@dataclass(frozen=True)
class Outer:
    title: str = "t"
    urls: tuple[str, ...] = ("x",)
    inner: Inner = field(default_factory=Inner)
    source: NamesOrPaths = NamesOrPaths("synthetic")  # noqa: RUF009 (an immutable str)

    def __post_init__(self) -> None:
        if self.inner.name not in ("a", "b"):
            raise ValueError(f"inner.name {self.inner.name!r} is unknown; use 'a' or 'b'")


def _problems(path: Path | None, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path, env=env)
    return info.value.problems


def test_a_table_check_blames_only_the_source_of_the_key_it_names(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('title = "x"\n[inner]\nname = "zzz"\n')
    env = {"FEDSILO_URLS": '["y"]', "FEDSILO_INNER__SIZE": "3"}
    (problem,) = _problems(path, env)
    assert problem.startswith(f"{path}: the top-level table is invalid: inner.name 'zzz'")
    assert "FEDSILO_URLS" not in problem and "FEDSILO_INNER__SIZE" not in problem
    (by_env,) = _problems(path, {**env, "FEDSILO_INNER__NAME": "q"})
    assert by_env.startswith("FEDSILO_INNER__NAME: the top-level table is invalid")


def test_a_check_naming_no_key_still_names_every_source(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class Picky:
        a: int = 0
        b: int = 0

        def __post_init__(self) -> None:
            if self.a + self.b > 1:
                raise ValueError("too much in total")

    path = tmp_path / "p.toml"
    path.write_text("a = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Picky, path, env={"FEDSILO_B": "1"})
    assert info.value.problems == [f"{path}, FEDSILO_B: the top-level table is invalid: "
                                   "too much in total"]


def test_an_unreadable_file_is_the_only_problem_reported(tmp_path: Path) -> None:
    problems = _problems(tmp_path / "absent.toml", {"FEDSILO_INNER__NAME": "zzz"})
    assert len(problems) == 1 and "config file not found" in problems[0]
    assert "title, urls, [inner], source" in problems[0]
    # a bad variable is still reported: it is wrong whatever the file holds
    problems = _problems(tmp_path / "absent.toml", {"FEDSILO_INNER__SIZE": "big"})
    assert len(problems) == 2 and problems[1].startswith("FEDSILO_INNER__SIZE:")


def test_names_or_paths_resolve_path_like_entries_like_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conf" / "c.toml"
    path.parent.mkdir()
    path.write_text('source = "agnews, own.toml,data/x,~/y.toml,/abs/z.toml"\n')
    cfg = load_config(Outer, path, env={})
    assert cfg.source == ",".join([
        "agnews", str(path.parent / "own.toml"), str(path.parent / "data/x"),
        str(Path("~/y.toml").expanduser()), "/abs/z.toml"])
    monkeypatch.chdir(tmp_path)
    from_env = load_config(Outer, path, env={"FEDSILO_SOURCE": "rel.toml"})
    assert from_env.source == str(tmp_path / "rel.toml")  # a variable: the current folder
    assert load_config(Outer, None, env={}).source == "synthetic"
    assert 'source = "agnews,' in dump_toml(cfg)
    path.write_text("source = 3\n")
    with pytest.raises(ConfigError, match=r"source: expected str, got 3 \(integer\)"):
        load_config(Outer, path, env={})


def test_a_silo_configs_relative_data_source_is_relative_to_the_file(tmp_path: Path) -> None:
    from fedsilo.silo_agent.config import SiloConfig

    path = tmp_path / "site" / "silo.toml"
    path.parent.mkdir()
    path.write_text('silo_id = "s"\n[data]\nsource = "own.toml"\n')
    assert load_config(SiloConfig, path, env={}).data.source == str(path.parent / "own.toml")
