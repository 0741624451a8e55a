"""A TaggedConfig table: its tag key picks the dataclass that fills it, from any source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedsilo.sdk.config import ConfigError, TaggedConfig, config_keys, load_config


@dataclass(frozen=True)
class Shape(TaggedConfig):
    tag = "kind"

    kind: str
    scale: float = 1.0

    @classmethod
    def variants(cls) -> Mapping[str, type]:
        return {"circle": Circle, "box": Box, "plain": Shape}


@dataclass(frozen=True)
class Circle(Shape):
    kind: str = "circle"
    radius: int = 2


@dataclass(frozen=True)
class Box(Shape):
    kind: str = "box"
    width: int = 3
    height: int = 4

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width = {self.width}: use an integer >= 1")


@dataclass(frozen=True)
class Drawing:
    name: str = "d"
    shape: Shape = field(default_factory=Circle)


def _load(tmp_path: Path, text: str | None = None, overrides: tuple[str, ...] = (),
          env: dict[str, str] | None = None) -> Drawing:
    path = None
    if text is not None:
        path = tmp_path / "drawing.toml"
        path.write_text(text)
    return load_config(Drawing, path, overrides, env=env or {})


def test_the_tag_picks_the_variant_and_its_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path).shape == Circle()
    assert _load(tmp_path, '[shape]\nkind = "box"\nwidth = 5\n').shape == Box(width=5)
    assert _load(tmp_path, '[shape]\nkind = "plain"\nscale = 2\n').shape == Shape("plain", 2.0)
    assert _load(tmp_path, "[shape]\nradius = 7\n").shape == Circle(radius=7)  # the default's


def test_the_tag_may_come_from_another_source_than_the_keys(tmp_path: Path) -> None:
    drawing = _load(tmp_path, "[shape]\nheight = 9\n", overrides=("shape.kind=box",))
    assert drawing.shape == Box(height=9)
    drawing = _load(tmp_path, env={"FEDSILO_SHAPE__KIND": "box", "FEDSILO_SHAPE__WIDTH": "2"})
    assert drawing.shape == Box(width=2)


def test_another_variants_key_is_refused_naming_who_takes_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, '[shape]\nkind = "circle"\nwidth = 5\n', overrides=("shape.height=1",))
    assert caught.value.problems == [
        f'{tmp_path / "drawing.toml"}: "shape.width" is a setting of kind = "box" only; '
        '[shape] with kind = "circle" takes: kind, scale, radius',
        '--set shape.height: "shape.height" is a setting of kind = "box" only; [shape] with '
        'kind = "circle" takes: kind, scale, radius',
    ]


def test_a_key_no_variant_takes_is_unknown_and_checks_still_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='unknown key "shape.depth".*allowed keys in '
                       r"\[shape\]: kind, scale, radius, width, height"):
        _load(tmp_path, "[shape]\ndepth = 1\n")
    with pytest.raises(ConfigError, match=r"\[shape\] is invalid: width = 0"):
        _load(tmp_path, '[shape]\nkind = "box"\nwidth = 0\n')


def test_config_keys_lists_the_other_variants_keys_with_their_tag() -> None:
    assert config_keys(Drawing) == [
        'name: str = "d"',
        'shape.kind: str = "circle"',
        "shape.scale: float = 1.0",
        "shape.radius: int = 2",
        'shape.width: int = 3 (with kind = "box")',
        'shape.height: int = 4 (with kind = "box")',
    ]
