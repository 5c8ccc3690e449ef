"""One reader for a run's options: a YAML, JSON or TOML file plus ``--set key=value`` overrides, typed by
a dataclass's annotations and range-checked, every error naming the file (or ``--set``) and what would be
right. ``realign train``, ``realign world train`` and ``realign world finetune`` all read through it.

    config = read_options(TrainConfig, "run.yaml", ["max_train_steps=200"])

The dataclass checks its own values in ``__post_init__`` with ``check_fields`` (so a config built in
code is checked too); this module adds what only a file can get wrong: the format, the syntax, unknown
keys, and YAML 1.1's reading of ``1e-5`` as text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")
# YAML 1.1 (PyYAML) reads 1e-5 as text: a float needs a dot there (1.0e-5). A float field takes it as a number.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

T = TypeVar("T")
# A Hub repository id: "name" or "owner/name" (letters, digits, "-", "_", "."); anything else is a local path.
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def select_named(names: Sequence[str], available: Mapping[str, T], what: str = "configuration") -> list[T]:
    """``available[name]`` for each of ``names``, in the order given (the rows of a table).

    An unknown name, a name given twice or no name at all is a ``ValueError`` that lists the choices.
    """
    names = list(names)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; expected some of {list(available)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{what}(s) named more than once: {repeated}")
    if not names:
        raise ValueError(f"no {what}s selected")
    return [available[name] for name in names]


@dataclass(frozen=True)
class Limit:
    """The numbers a numeric option may take: ``low`` and ``high`` (``None``: unbounded), each included
    unless ``low_open`` / ``high_open``, and optionally a ``multiple_of``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "finite"
        return text if self.multiple_of is None else f"a multiple of {self.multiple_of}, {text}"


POSITIVE = Limit(0, low_open=True)
AT_LEAST_ONE = Limit(1)
NON_NEGATIVE = Limit(0)
FRACTION = Limit(0, 1)


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation) and typing.get_origin(annotation) in (
        typing.Union,
        types.UnionType,
    )


def _strip_optional(annotation: Any) -> Any:
    if _is_optional(annotation):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return annotation


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the type ``annotation`` names (``int``, ``float`` (an int is one too), ``str``,
    ``bool``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any``)."""
    if annotation is Any:
        return True
    if _is_optional(annotation):
        return value is None or matches(value, _strip_optional(annotation))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(item, args[1]) for item in value.values())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def describe_type(annotation: Any) -> str:
    """``annotation`` in words, for error messages."""
    if _is_optional(annotation):
        return f"{describe_type(_strip_optional(annotation))} or null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(annotation, str(annotation))


def field_problems(
    obj: Any, limits: Mapping[str, Limit] | None = None, choices: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Every field of the dataclass ``obj`` whose value has the wrong type, is outside its ``limits``
    entry or not one of its ``choices`` entry, as ``"name must be ..., got ..."`` messages."""
    limits, choices = limits or {}, choices or {}
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        value, annotation = getattr(obj, f.name), hints[f.name]
        if not matches(value, annotation):
            problems.append(f"{f.name} must be {describe_type(annotation)}, got {value!r}")
        elif value is None:
            continue
        elif f.name in choices and value not in choices[f.name]:
            options = ", ".join(repr(choice) for choice in choices[f.name])
            problems.append(f"{f.name} must be one of {options}, got {value!r}")
        elif f.name in limits:
            limit = limits[f.name]
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(limit.admits(item) for item in items):
                expected = describe_type(_strip_optional(annotation)) + " " + limit.describe()
                problems.append(f"{f.name} must be {expected}, got {value!r}")
    return problems


def check_fields(
    obj: Any, limits: Mapping[str, Limit] | None = None, choices: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Raise ``UsageError`` with the first of ``field_problems``; a dataclass calls it in ``__post_init__``."""
    problems = field_problems(obj, limits, choices)
    if problems:
        raise UsageError(problems[0])


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML, JSON or TOML file (by suffix); every error names the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise UsageError(
            f"{path}: unknown config format {path.suffix or '(no suffix)'!r}; use {', '.join(CONFIG_SUFFIXES)}"
        )
    if not path.is_file():
        raise UsageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml  # PyYAML comes with accelerate and huggingface_hub

            data = yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise UsageError(f"{path}: not valid TOML ({error})") from None
    except Exception as error:
        import yaml

        if not isinstance(error, yaml.YAMLError):
            raise
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML ({where}{problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must hold a mapping of option names to values, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as YAML (so ``3``, ``1e-4``, ``[30, 40]``, ``null`` work)."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_train_steps=200")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UsageError(f"--set {text!r}: the value is not valid YAML (quote text with spaces or colons)") from None
    return key.strip(), parsed


def _coerce(value: Any, annotation: Any) -> Any:
    """What a file means, not a silent fix: ``1e-5`` (text in YAML 1.1) for a float field, a list for a tuple."""
    inner = _strip_optional(annotation)
    if inner is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if typing.get_origin(inner) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def read_options(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> T:
    """An instance of the dataclass ``cls`` from ``base`` (defaults of a command), the file at ``path``,
    then ``overrides`` (``["key=value", ...]`` or a mapping), each on top of the one before.

    Unknown keys are an error (a typo must not fall back to a default), and so is every value the
    dataclass's ``__post_init__`` rejects; each error names where the value came from.
    """
    data: dict[str, Any] = dict(base or {})
    origin = dict.fromkeys(data, "defaults")
    if path is not None:
        from_file = read_config_file(path)
        data.update(from_file)
        origin.update(dict.fromkeys(from_file, str(path)))
    if overrides is not None:
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
        for key, value in items:
            data[key] = value
            origin[key] = "--set"
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(sorted(known))}"
            raise UsageError(f"{origin[key]}: unknown option {key!r} ({hint})")
    hints = typing.get_type_hints(cls)
    data = {key: _coerce(value, hints[key]) for key, value in data.items()}
    try:
        return cls(**data)
    except UsageError as error:
        name = str(error).split(" ", 1)[0]
        where = origin.get(name) or " and ".join(dict.fromkeys(origin.values())) or "config"
        raise UsageError(f"{where}: {error}") from None


def add_config_arguments(parser: Any, *, required: bool, what: str) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``, the same on every command that reads options."""
    parser.add_argument(
        "--config",
        required=required,
        type=Path,
        metavar="FILE",
        help=f"a YAML, JSON or TOML file of {what}" + ("" if required else " (default: none)"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option (the value is read as YAML: 3, 1e-5, [30, 40], null); repeatable",
    )


def check_model_source(flag: str, value: str, needs: Sequence[str]) -> None:
    """``value`` is a local folder holding one of ``needs`` (relative paths) or could be a Hub repo id."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {value}: a file, not a diffusers folder or a Hub repo id")
        if not any((path / need).is_file() for need in needs):
            raise UsageError(f"{flag} {value}: the folder has no {' or '.join(needs)} (not a diffusers folder)")
    elif not HUB_REPO_ID.fullmatch(value):
        raise UsageError(f"{flag} {value}: no such folder (and not a Hub repo id such as owner/name)")
