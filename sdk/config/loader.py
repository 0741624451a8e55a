"""Typed, nested (frozen) dataclass configs from TOML, environment variables and ``--set`` flags.

Precedence: dataclass defaults < TOML file < ``FEDSILO_*`` environment < ``--set key=value``.
Every problem is collected and raised together as one :class:`ConfigError`, a line each,
naming its source (file, variable or flag) and the full dotted key.

Rules worth knowing (tested in tests/sdk/config/test_loader.py):

* TOML has no null. An absent key keeps its default. For an ``X | None`` field, ``""`` means
  None *only where ""`` is not itself a valid X*: ``Path | None`` and ``int | None`` read ``""``
  as None (so ``FEDSILO_BROKER__PASSWORD_FILE=`` unsets a path the file set), while
  ``str | None`` keeps ``""`` as the empty string. A plain ``Path`` rejects ``""``.
* int is accepted for float; a float is never truncated to int; nothing becomes a bool
  except TOML ``true``/``false``.
* Paths expand ``~``; relative ones resolve against the config file's folder (file values) or
  the current directory (environment, ``--set``). Defaults are kept as written. A
  :class:`NamesOrPaths` field (``"agnews,own.toml"``) resolves its path-like entries the same
  way. A config file that cannot be read is the only problem reported (plus bad variables or
  flags): the defaults' own checks would only add noise.
* A table's own check (``__post_init__``) is blamed on the sources of the keys its message
  names, so an unrelated variable is not named for another key's bad value.
* Setting a ``dict[str, X]`` table (in the file, or ``--set extra={a=1}``) replaces the default
  or earlier table; setting one key of it (``--set extra.a=1``, ``FEDSILO_EXTRA__A=1``) merges.
* Environment: ``FEDSILO_ROUNDS__DEADLINE_S=30`` (``__`` nests), matched case-insensitively;
  dict keys taken from a variable name are lower case. Prefixed variables that match no key
  are ignored, since other tools share the prefix; :func:`unmatched_env_vars` lists them and
  :func:`load_config` logs their names at DEBUG.
* An environment or ``--set`` value is read as a TOML value when it parses (``30``, ``true``,
  ``["a", "b"]``, ``"x"``); otherwise, or when the parsed value does not fit the field but the
  raw text does (``FEDSILO_NAME=123`` for a str), the raw text is used as a string.
* A :class:`TaggedConfig` table (``[strategy]``) is filled by the variant its tag key names
  (``name = "fedlease"``), from whichever source set it: every variant's keys resolve, and a
  key the chosen variant does not take is refused, naming the variants that take it.
* Secrets: ``field(metadata={"secret": True})`` is never shown; ``{"secret": "url"}`` masks only
  the password of URLs (``amqp://user:***@host/``). Error messages never echo either.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")
_log = logging.getLogger(__name__)
_MISSING: Any = dataclasses.MISSING
_UNSET, _RESET, _FAILED = object(), object(), object()  # tree markers; _RESET = dict replaced
_URL_PASSWORD = re.compile(r"(^|//)([^/@:\s]*):([^/\s]*)@")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
Secret = bool | str  # False, True, or "url"


class ConfigError(ValueError):
    """Every configuration problem; ``problems`` holds all of them, one line each."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TaggedConfig(ABC):
    """Base of a dataclass table whose `tag` key picks the subclass that fills it, as
    `[strategy].name` picks a strategy's own settings."""

    tag: ClassVar[str]

    @classmethod
    @abstractmethod
    def variants(cls) -> Mapping[str, type]:
        """Tag value -> the dataclass that fills the table under it."""


class _Bad(Exception):
    """Conversion problems (without their source), raised inside and collected by callers."""

    def __init__(self, *msgs: str) -> None:
        super().__init__(*msgs)
        self.msgs = msgs


class NamesOrPaths(str):
    """A str field of comma-separated names or paths (``"agnews,own.toml"``): an entry that
    looks like a path (a suffix, a ``/`` or a leading ``~``) resolves like a ``Path`` value,
    so a config file's relative paths all mean the same folder, the file's own."""


def _resolve_entries(text: str, base: Path) -> str:
    out = []
    for entry in text.split(","):
        name = entry.strip()
        if name and (Path(name).suffix or "/" in name or os.sep in name or name[0] == "~"):
            path = Path(name).expanduser()
            name = str(path if path.is_absolute() else base / path)
        out.append(name if name else entry)
    return ",".join(out)


@dataclasses.dataclass(frozen=True)
class _Origin:
    label: str  # the file path as given, an environment variable name, or "--set key"
    base: Path  # the folder relative paths resolve against


@dataclasses.dataclass(frozen=True)
class _Text:
    """An environment/--set value: its TOML reading, and the raw text to fall back on."""

    text: str
    parsed: Any

    @classmethod
    def of(cls, text: str) -> _Text:
        try:
            doc = tomllib.loads(f"v = {text}")
        except tomllib.TOMLDecodeError:
            return cls(text, text)
        return cls(text, doc["v"] if set(doc) == {"v"} else text)  # "1\nx=2" stays text


class _Node:
    """One key of the merged tree: a leaf value (or _RESET for a replaced dict), children."""

    def __init__(self) -> None:
        self.value: Any = _UNSET
        self.origin: _Origin | None = None
        self.children: dict[str, _Node] = {}


# --- schema helpers ---------------------------------------------------------------------------

def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _keys(table: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """The keys a table may hold: its fields, or every variant's for a TaggedConfig."""
    if not issubclass(table, TaggedConfig):
        return _fields(table)
    keys = _fields(table)
    for variant in table.variants().values():
        keys |= {k: v for k, v in _fields(variant).items() if k not in keys}
    return keys


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not _MISSING else _MISSING


def _secret_of(f: dataclasses.Field[Any], inherited: Secret) -> Secret:
    own = f.metadata.get("secret", False)
    own = "url" if own == "url" else bool(own)
    return True if True in (own, inherited) else (own or inherited)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _table_type(tp: Any, raw: Any) -> Any:
    """The dataclass or dict type that a TOML table ``raw`` fills, or None for a leaf."""
    if not isinstance(raw, dict):
        return None
    if _is_union(tp):
        tables = [a for a in get_args(tp) if _table_type(a, raw) is not None]
        return tables[0] if len(tables) == 1 else None
    return tp if _is_dc(tp) or (get_origin(tp) or tp) in (dict, Mapping) else None


def _value_type(dict_tp: Any) -> Any:
    args = get_args(dict_tp)
    return args[1] if len(args) == 2 else Any


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if tp is NamesOrPaths:
        return "str"
    if origin is Literal:
        return " | ".join(_render(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


# --- rendering and secrets --------------------------------------------------------------------

def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
                       (list, "array"), (dict, "table")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _render(value: Any) -> str:
    """A value as TOML text (inline tables for dicts); also used in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf") \
            if not math.isfinite(value) else repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_render(v)}" for k, v in value.items() if v is not None)
        return "{" + (f" {inner} " if inner else "") + "}"
    return str(value)


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _render(k)


def _show(value: Any, secret: Secret) -> str:
    if secret:
        kind = _toml_type(value)
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} (secret, not shown)"
    text = _render(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} ({_toml_type(value)})"


def _mask(text: str, secret: Secret) -> str:
    return "***" if secret is True else _URL_PASSWORD.sub(r"\1\2:***@", text) if secret else text


def _plain(value: Any, secret: Secret, redact: bool) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name), _secret_of(f, secret), redact)
                for name, (f, _) in _fields(type(value)).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, secret, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, secret, redact) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if not redact or not secret or value is None:
        return value
    if isinstance(value, str):
        return _mask(value, secret)
    return "***" if secret is True else value  # "url" masks URL passwords only


def _secret_strings(value: Any, secret: Secret, found: set[str]) -> None:
    """Collect what a message must not contain: whole secrets, URL passwords."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for name, (f, _) in _fields(type(value)).items():
            _secret_strings(getattr(value, name), _secret_of(f, secret), found)
    elif isinstance(value, Mapping | list | tuple):
        for v in value.values() if isinstance(value, Mapping) else value:
            _secret_strings(v, secret, found)
    elif secret and isinstance(value, str | Path):
        text = str(value)
        found.update([text] if secret is True else (m[3] for m in _URL_PASSWORD.finditer(text)))


# --- conversion -------------------------------------------------------------------------------

def _expected(key: str, tp: Any, value: Any, secret: Secret) -> _Bad:
    return _Bad(f"{key}: expected {_type_name(tp)}, got {_show(value, secret)}")


def _convert(value: Any, tp: Any, key: str, base: Path, secret: Secret) -> Any:
    """One leaf value to ``tp``; raises _Bad naming the key, the type and (unless secret) value."""
    if isinstance(value, _Text):
        try:
            return _convert(value.parsed, tp, key, base, secret)
        except _Bad as first:
            if isinstance(value.parsed, str):
                raise
            try:
                return _convert(value.text, tp, key, base, secret)
            except _Bad:
                raise first from None
    origin, args = get_origin(tp) or tp, get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, base, secret)
            except _Bad as e:
                errors.append(e)
        if value == "" and len(options) < len(args):
            return None
        raise errors[0] if len(options) == 1 else _expected(key, tp, value, secret)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        shown = "this value (secret, not shown)" if secret else _render(value)
        raise _Bad(f"{key} = {shown} is not allowed; use one of "
                   + ", ".join(_render(a) for a in args))
    if tp is NamesOrPaths:
        if not isinstance(value, str):
            raise _expected(key, str, value, secret)
        return NamesOrPaths(_resolve_entries(value, base))
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp in (int, float) and isinstance(value, int | tp) and not isinstance(value, bool):
        return tp(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise _Bad(f"{key}: expected a non-empty path string, got {_show(value, secret)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if origin in (tuple, list) and isinstance(value, list):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Bad(f"{key}: expected {len(args)} items, got {len(value)}")
            types_ = args
        else:
            types_ = (args[0] if args else Any,) * len(value)
        items = [_convert(v, t, f"{key}[{i}]", base, secret)
                 for i, (v, t) in enumerate(zip(value, types_, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) and isinstance(value, dict):
        return {k: _convert(v, _value_type(tp), f"{key}.{k}", base, secret)
                for k, v in value.items()}
    if _is_dc(tp) and isinstance(value, dict):  # a table inside an array: [[silos]]
        return _make(tp, value, key, base, secret)
    if not (tp in (bool, str, int, float) or origin in (tuple, list, dict, Mapping) or _is_dc(tp)):
        raise _Bad(f"{key}: unsupported field type {_type_name(tp)} (fix the schema)")
    raise _expected(key, tp, value, secret)


def _make(cls: type, raw: dict[str, Any], key: str, base: Path, secret: Secret) -> Any:
    msgs: list[str] = []
    kwargs: dict[str, Any] = {}
    flds = _fields(cls)
    msgs += [_unknown(tuple(key.split(".")), k, flds) for k in raw if k not in flds]
    for name, (f, hint) in flds.items():
        if name in raw:
            try:
                kwargs[name] = _convert(raw[name], hint, f"{key}.{name}", base,
                                        _secret_of(f, secret))
            except _Bad as e:
                msgs += e.msgs
        elif _default(f) is _MISSING:
            msgs.append(f'missing required key "{key}.{name}" ({_type_name(hint)})')
    if msgs:
        raise _Bad(*msgs)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise _Bad(f"[{key}] is invalid: {_scrub(str(e), kwargs, cls, secret)}") from None


def _scrub(message: str, values: Mapping[str, Any], cls: type, secret: Secret) -> str:
    found: set[str] = set()
    for name, (f, _) in _fields(cls).items():
        if name in values:
            _secret_strings(values[name], _secret_of(f, secret), found)
    for text in sorted(found, key=len, reverse=True):
        message = message.replace(text, "***") if text else message
    return message


def _unknown(path: tuple[str, ...], name: str, allowed: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    hint = f'; did you mean "{".".join((*path, close[0]))}"? ' if close else "; "
    where = f"in [{'.'.join(path)}]" if path else "at the top level"
    return (f'unknown key "{".".join((*path, name))}"{hint}allowed keys {where}: '
            + ", ".join(allowed))


# --- sources -> assignments -> tree -> dataclasses --------------------------------------------

Assignment = tuple[tuple[str, ...], Any, _Origin]


def _flatten(tp: Any, value: Any, path: tuple[str, ...], origin: _Origin, secret: Secret,
             out: list[Assignment], problems: list[str]) -> None:
    """Split a value into converted leaf assignments, following the schema's tables."""
    raw = value.parsed if isinstance(value, _Text) else value
    table = _table_type(tp, raw)
    if table is None:
        try:
            out.append((path, _convert(value, tp, ".".join(path), origin.base, secret), origin))
        except _Bad as e:
            problems.extend(f"{origin.label}: {m}" for m in e.msgs)
            out.append((path, _FAILED, origin))
    elif _is_dc(table):
        flds = _keys(table)
        for k, v in raw.items():
            if k not in flds:
                problems.append(f"{origin.label}: {_unknown(path, k, flds)}")
                continue
            f, hint = flds[k]
            _flatten(hint, v, (*path, k), origin, _secret_of(f, secret), out, problems)
    else:
        out.append((path, _RESET, origin))
        for k, v in raw.items():
            _flatten(_value_type(table), v, (*path, k), origin, secret, out, problems)


def _resolve(cls: type, parts: Sequence[str], ignore_case: bool
             ) -> tuple[tuple[str, ...], Any, Secret] | str:
    """A dotted key (or env name parts) to (path, type, secret), or why it names no key."""
    tp: Any = cls
    path: tuple[str, ...] = ()
    secret: Secret = False
    if not all(parts):
        return f'"{".".join(parts)}" has an empty key part'
    for part in parts:
        table = _table_type(tp, {})
        if table is None:
            return f'"{".".join(path)}" is not a table, so "{".".join((*path, part))}" is no key'
        if _is_dc(table):
            flds = _keys(table)
            want = part.lower() if ignore_case else part
            name = next((n for n in flds if (n.lower() if ignore_case else n) == want), None)
            if name is None:
                return _unknown(path, part, flds)
            f, tp = flds[name]
            secret = _secret_of(f, secret)
        else:
            name, tp = (part.lower() if ignore_case else part), _value_type(table)
        path = (*path, name)
    return path, tp, secret


def _env(cls: type, env: Mapping[str, str] | None, prefix: str
         ) -> tuple[list[tuple[str, tuple[tuple[str, ...], Any, Secret]]], list[str]]:
    env = os.environ if env is None else env
    matched, unmatched = [], []
    for name in sorted(n for n in env if n.startswith(prefix)):
        target = _resolve(cls, name[len(prefix):].split("__"), ignore_case=True)
        if isinstance(target, str):
            unmatched.append(name)
        else:
            matched.append((name, target))
    return matched, unmatched


def _read(path: Path | str, cls: type, problems: list[str]) -> Any:
    label, file = str(path), Path(path).expanduser()
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        flds = _fields(cls)
        keys = ", ".join(f"[{n}]" if _table_type(h, {}) else n for n, (_, h) in flds.items())
        problems.append(f"{label}: config file not found (looked at {file.absolute()}); create "
                        f"it as a TOML file holding only the keys to change (top-level keys: "
                        f"{keys}), or pass another path")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{label}: cannot read config file: {e}")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{label}: invalid TOML: {e}")
    return None


def _assign(root: _Node, path: tuple[str, ...], value: Any, origin: _Origin) -> None:
    node = root
    for part in path:
        if node.value is not _RESET:
            node.value = _UNSET  # a key below means this is a table, not a leaf
        node = node.children.setdefault(part, _Node())
    node.value, node.origin, node.children = value, origin, {}


def _origins(node: _Node) -> list[str]:
    found = [node.origin.label] if node.origin else []
    return found + [label for child in node.children.values() for label in _origins(child)]


def _assigned(node: _Node, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(key below `node`, source) of every value set in the tree under `node`."""
    if node.origin is not None:
        yield path, node.origin.label
    for name, child in node.children.items():
        yield from _assigned(child, (*path, name))


def _blamed(node: _Node, path: tuple[str, ...], message: str) -> list[str]:
    """The sources of the keys a table's own check names in `message` (relative to the
    table or in full), so an unrelated variable that set some other key is not blamed;
    every source under the table when the message names none of them."""
    named = []
    for key, label in _assigned(node):
        for dotted in {".".join(key), ".".join((*path, *key))}:
            if key and re.search(rf"(?<![\w.]){re.escape(dotted)}(?!\w)", message):
                named.append(label)
    return list(dict.fromkeys(named)) or list(dict.fromkeys(_origins(node)))


def _build(tp: Any, default: Any, node: _Node, path: tuple[str, ...], secret: Secret,
           problems: list[str]) -> Any:
    if not node.children and node.value is not _UNSET and node.value is not _RESET:
        return node.value
    table = _table_type(tp, {})
    if _is_dc(table):
        return _build_dc(table, default if isinstance(default, table) else None, node, path,
                         secret, problems)
    result = {} if node.value is _RESET or not isinstance(default, Mapping) else dict(default)
    for k, child in node.children.items():
        result[k] = _build(_value_type(table), result.get(k), child, (*path, k), secret, problems)
    return _FAILED if any(v is _FAILED for v in result.values()) else result


def _build_dc(cls: type, base: Any, node: _Node, path: tuple[str, ...], secret: Secret,
              problems: list[str]) -> Any:
    """The dataclass for one table: ``base`` (its default instance) updated with the tree."""
    if issubclass(cls, TaggedConfig):
        cls, base, refused = _variant(cls, base, node, path)
        if refused:
            problems.extend(refused)
            return _FAILED
    changes: dict[str, Any] = {}
    failed = False
    for name, (f, hint) in _fields(cls).items():
        child = node.children.get(name)
        if child is None:
            if base is None and _default(f) is _MISSING:
                problems.append(f'missing required key "{".".join((*path, name))}" '
                                f"({_type_name(hint)})")
                failed = True
            continue
        default = getattr(base, name) if base is not None else _default(f)
        changes[name] = _build(hint, default, child, (*path, name), _secret_of(f, secret),
                               problems)
        failed = failed or changes[name] is _FAILED
    if failed:
        return _FAILED
    if base is not None and not changes:
        return base
    try:
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
    except ValueError as e:  # the schema's own __post_init__ checks
        values = {n: getattr(base, n) if base is not None else _default(f)
                  for n, (f, _) in _fields(cls).items()} | changes
        where = f"[{'.'.join(path)}]" if path else "the top-level table"
        reason = _scrub(str(e), values, cls, secret)
        sources = ", ".join(_blamed(node, path, reason)) or "defaults"
        problems.append(f"{sources}: {where} is invalid: {reason}")
        return _FAILED


def _variant(cls: type[TaggedConfig], base: Any, node: _Node, path: tuple[str, ...]
             ) -> tuple[type, Any, list[str]]:
    """The variant the tag names (kept as the default's for an unknown tag, which the table's
    own check or its parent's reports), its default instance, and the keys it refuses."""
    tagged = node.children.get(cls.tag)
    if tagged is not None and tagged.value is not _UNSET:
        tag = tagged.value
    else:
        tag = getattr(base, cls.tag) if base is not None else _default(_fields(cls)[cls.tag][0])
    variants = cls.variants()
    chosen = variants.get(tag) if isinstance(tag, str) else None
    if chosen is None:  # not a tag: whoever checks it says so; the other keys wait for it
        return type(base) if base is not None else cls, base, []
    own = _fields(chosen)
    refused = []
    for key, child in node.children.items():
        if key in own:
            continue
        takers = " or ".join(_render(t) for t, v in variants.items() if key in _fields(v))
        refused += [f'{label}: "{".".join((*path, key))}" is a setting of {cls.tag} = {takers} '
                    f"only; [{'.'.join(path)}] with {cls.tag} = {_render(tag)} takes: "
                    + ", ".join(own) for label in dict.fromkeys(_origins(child))]
    return chosen, base if type(base) is chosen else None, refused


# --- public API -------------------------------------------------------------------------------

def load_config(cls: type[T], path: Path | str | None = None, overrides: Sequence[str] = (),
                env: Mapping[str, str] | None = None, env_prefix: str = "FEDSILO_") -> T:
    """Build ``cls`` from defaults < TOML file < environment < ``key=value`` overrides.

    ``env=None`` reads ``os.environ``. Raises one ConfigError listing every problem found.
    """
    if not _is_dc(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    problems: list[str] = []
    out: list[Assignment] = []
    unread = False  # the file could not be read: judging the rest would only add noise
    if path is not None:
        data = _read(path, cls, problems)
        unread = data is None
        if data is not None:
            base = Path(path).expanduser().absolute().parent
            _flatten(cls, data, (), _Origin(str(path), base), False, out, problems)
    cwd = Path.cwd()
    matched, unmatched = _env(cls, env, env_prefix)
    if unmatched:
        _log.debug("ignoring %s variables that match no config key: %s", env_prefix,
                   ", ".join(unmatched))
    source = os.environ if env is None else env
    for name, (key, tp, secret) in matched:
        _flatten(tp, _Text.of(source[name]), key, _Origin(name, cwd), secret, out, problems)
    for item in overrides:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        label = f"--set {dotted}"
        if not sep or not dotted:
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        target = _resolve(cls, dotted.split("."), ignore_case=False)
        if isinstance(target, str):
            problems.append(f"{label}: {target}")
            continue
        _flatten(target[1], _Text.of(text), target[0], _Origin(label, cwd), target[2], out,
                 problems)
    if unread:
        raise ConfigError(problems)
    root = _Node()
    for key, value, origin in out:
        _assign(root, key, value, origin)
    result = _build_dc(cls, None, root, (), False, problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, result)


def unmatched_env_vars(cls: type, env: Mapping[str, str] | None = None,
                       env_prefix: str = "FEDSILO_") -> list[str]:
    """Names (never values) of prefixed variables that set no key; load_config ignores them."""
    return _env(cls, env, env_prefix)[1]


def config_to_dict(obj: Any, redact: bool = True) -> dict[str, Any]:
    """A JSON/TOML-friendly dict (Paths as str, tuples as lists, None kept); secrets masked."""
    return typing.cast(dict[str, Any], _plain(obj, False, redact))


def dump_toml(obj: Any, redact: bool = True) -> str:
    """The effective config as TOML, e.g. for a command's ``--print-config``; secrets masked.

    None values (TOML has no null) are written as comments.
    """
    lines: list[str] = []

    def table(d: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        subtables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (len(subtables) < len(d) or not d):
            lines.extend(["", f"[{'.'.join(_key(p) for p in prefix)}]"])
        for k, v in d.items():
            if k not in subtables:
                lines.append(f"# {_key(k)}: not set" if v is None else f"{_key(k)} = {_render(v)}")
        for k, v in subtables.items():
            table(v, (*prefix, k))

    table(config_to_dict(obj, redact), ())
    return "\n".join(lines).lstrip("\n") + "\n"


def config_keys(cls: type) -> list[str]:
    """Every settable dotted key with its type and default, e.g. for ``--help`` and docs."""
    lines: list[str] = []

    def walk(tp: Any, default: Any, path: tuple[str, ...], secret: Secret, note: str = ""
             ) -> None:
        table = _table_type(tp, {})
        if _is_dc(table):
            own = type(default) if isinstance(default, table) else table
            for name, (f, hint) in _fields(own).items():
                d = getattr(default, name) if isinstance(default, own) else _default(f)
                walk(hint, d, (*path, name), _secret_of(f, secret), note)
            if issubclass(table, TaggedConfig):  # the other variants' keys, each once
                seen = set(_fields(own))
                for tag, variant in table.variants().items():
                    for name, (f, hint) in _fields(variant).items():
                        if name not in seen:
                            seen.add(name)
                            walk(hint, _default(f), (*path, name), _secret_of(f, secret),
                                 f" (with {table.tag} = {_render(tag)})")
            return
        if table is not None and _is_dc(_value_type(table)):
            walk(_value_type(table), _MISSING, (*path, "<name>"), secret)
            return
        shown = ("(required)" if default is _MISSING else "= (unset)" if default is None
                 else f"= {_render(_plain(default, secret, redact=True))}")
        lines.append(f"{'.'.join(path)}: {_type_name(tp)} {shown}{note}")

    walk(cls, _MISSING, (), False)
    return lines
