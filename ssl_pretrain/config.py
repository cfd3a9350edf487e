"""Typed configuration trees: dataclasses loaded from YAML with dotted command-line overrides.

Every entry point (`pretrain`, `finetune`, `sweep`) owns one tree of dataclasses. Fields are
declared with :func:`option`, which keeps the default, a one-line help text and the field's bounds
(``ge``, ``gt``, ``le``, ``lt``, ``choices``, ``length``) together; ``--help`` lists every key with
its default, type, bounds and help. The loader checks values against the field types and bounds
once, under the dotted key the user typed (:func:`validate`); a dataclass adds a
``check_fields()`` method only for rules that relate fields, raising :class:`FieldError` with a
relative key. Every problem is reported as one :class:`ConfigError` line that names the key (and
the file) and what is allowed.

Example:
    >>> @dataclass
    ... class Train:
    ...     lr: float = option(1e-3, "peak learning rate", gt=0)
    >>> @dataclass
    ... class Run:
    ...     out_dir: str = option("runs/x", "everything the run writes goes under it")
    ...     train: Train = option(factory=Train, help="optimisation")
    >>> load_config(Run, overrides=["train.lr=3e-4"]).train.lr
    0.0003
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ssl_pretrain.fileio import atomic_write_text

T = TypeVar("T")

__all__ = [
    "Bounds", "ConfigError", "FieldError", "bounds_of", "describe", "flatten", "from_dict", "load_config", "option",
    "parse_config", "save_config", "to_dict", "validate",
]


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used; the message names it."""


class FieldError(ConfigError):
    """A rule of one field broken, raised by a config class's ``check_fields()``.

    The message is relative (``"crop_scale: need min <= max, got [0.9, 0.5]"``); the config loader
    puts the dotted path the user typed in front of it (``contrastive.augment.crop_scale: …``).
    """


_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Bounds:
    """What a field's value may be, besides its type: checked by the loader under the dotted key.

    Numbers are checked as they are; lists and tuples element by element (and by ``length``).
    ``None`` (an optional field left unset) is never out of bounds.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    length: tuple[int, int | None] | None = None  # (min, max) items; max None = no upper limit
    rule: str | None = None  # the message when a bound is broken, instead of the generic one ("{value}": the value)
    unbounded: str | None = None  # why a numeric field has no bounds (the schema test asks)

    def _range(self) -> str:
        """The numeric bounds as text: ``in [0, 1)``, ``>= 1``, ``< 0.5``; empty when there are none."""
        lo = f"[{_num(self.ge)}" if self.ge is not None else (f"({_num(self.gt)}" if self.gt is not None else None)
        hi = f"{_num(self.le)}]" if self.le is not None else (f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if hi:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return ""

    def describe(self) -> str:
        """Short text for ``--help``: ``> 0``, ``in [0, 1)``, ``0 | 1 | 2``, ``2 items``."""
        parts = [self._range()] if self._range() else []
        if self.choices is not None:
            parts.append(" | ".join(repr(c) if isinstance(c, str) else str(c) for c in self.choices))
        if self.length is not None:
            a, b = self.length
            parts.append(f"{a} items" if a == b else (f">= {a} items" if b is None else f"{a}..{b} items"))
        return ", ".join(parts)

    def violation(self, value: Any) -> str | None:
        """Why ``value`` breaks these bounds (one phrase), or ``None`` when it keeps them."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if self.length is not None:
                a, b = self.length
                if len(value) < a or (b is not None and len(value) > b):
                    want = f"{a}" if a == b else (f"at least {a}" if b is None else f"{a} to {b}")
                    return f"need {want} values, got {list(value)}"
            for i, v in enumerate(value):
                why = self._scalar(v)
                if why is not None:
                    return f"item {i} {why}, got {list(value)}"
            return None
        why = self._scalar(value)
        return None if why is None else f"{why}, got {value!r}"

    def _scalar(self, v: Any) -> str | None:
        if self.choices is not None and v not in self.choices:
            shown = [repr(c) if isinstance(c, str) else str(c) for c in self.choices]
            return f"must be {', '.join(shown[:-1])} or {shown[-1]}" if len(shown) > 1 else f"must be {shown[0]}"
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        lo_ok = (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
        hi_ok = (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
        if lo_ok and hi_ok:
            return None
        return f"must be {self._range()}"


def _num(x: float | None) -> str:
    return repr(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else repr(x)


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    length: int | tuple[int, int | None] | None = None,
    rule: str | None = None,
    unbounded: str | None = None,
) -> Any:
    """Declare a config field: its default, a one-line help text and what values it takes.

    The bounds are checked once, by the config loader, under the dotted key the user typed; a
    field of a list type has them checked on every item.

    Args:
        default: The default value (immutable: int, float, str, bool, tuple, None).
        help: One line shown by ``--help``.
        factory: Builds the default for mutable values and nested dataclasses.
        ge, gt, le, lt: Numeric bounds (``>=``, ``>``, ``<=``, ``<``).
        choices: The allowed values (for numbers; strings use ``Literal``).
        length: Exact item count of a list field, or ``(min, max)`` with ``max`` None for no limit.
        rule: Message shown when a bound is broken, in place of the generic one.
        unbounded: For a numeric field without bounds: why any value is fine.
    """
    if isinstance(length, int):
        length = (length, length)
    bounds = Bounds(ge, gt, le, lt, tuple(choices) if choices is not None else None, length, rule, unbounded)
    meta = {"help": help, "bounds": bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is _MISSING:
        raise TypeError("option() needs a default or a factory")
    return dataclasses.field(default=default, metadata=meta)


def bounds_of(f: dataclasses.Field) -> Bounds:
    """The :class:`Bounds` a field was declared with (none for a plain ``dataclasses.field``)."""
    return f.metadata.get("bounds", Bounds())


# ---------------------------------------------------------------------------------------------
# value conversion against the declared types
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the declared type ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in get_args(tp))}; got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, filling defaults; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(names))}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ check
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) else f"{prefix.rstrip('.') or cls.__name__}: {msg}") from None


def validate(cfg: Any, prefix: str = "") -> None:
    """Check a config tree: every field's declared bounds, then every class's own rules.

    Bounds of the whole tree are checked first (``option(ge=…, choices=…)``), then, children first,
    the ``check_fields()`` method of each dataclass that has one: rules that relate fields (``min <=
    max``, ``warmup < max_steps``). Every message names the field by ``prefix`` + its dotted path.

    Args:
        cfg: A config dataclass (the loader's tree, or one built in code).
        prefix: The dotted key ``cfg`` sits under, as the user types it (``"data."``).

    Raises:
        ConfigError: The first value out of bounds or rule broken, in one line.
    """
    _check_bounds(cfg, prefix)
    _check_rules(cfg, prefix)


def _check_bounds(cfg: Any, prefix: str) -> None:
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_bounds(value, f"{prefix}{f.name}.")
            continue
        _convert(value, hints[f.name], prefix + f.name)  # a config built in code has not been converted
        b = bounds_of(f)
        why = b.violation(value)
        if why is not None:
            shown = list(value) if isinstance(value, tuple) else value
            if b.rule:  # the field's own wording; "{value}" in it stands for the value given
                why = b.rule.format(value=repr(shown)) if "{value}" in b.rule else f"{b.rule}, got {shown!r}"
            raise ConfigError(f"{prefix}{f.name}: {why}")


def _check_rules(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_rules(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "check_fields", None)
    if callable(check):
        try:
            check()
        except FieldError as e:
            raise ConfigError(f"{prefix}{e}") from None


# ---------------------------------------------------------------------------------------------
# nested dict helpers
# ---------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config tree as plain nested dicts and lists (YAML / JSON safe)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Return ``{"train.lr": 0.001, ...}``: every leaf of the tree under its dotted key."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_override(word: str) -> tuple[str, Any]:
    if "=" not in word:
        raise ConfigError(f"{word}: expected a dotted.key=value override")
    key, raw = word.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{word}: empty key before '='")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> T:
    """Load a config tree from an optional YAML file plus dotted ``key=value`` overrides.

    Args:
        cls: The root dataclass.
        path: YAML file; its keys override the dataclass defaults.
        overrides: Words like ``train.lr=3e-4`` (values parsed as YAML), applied last.

    Returns:
        The validated config tree.

    Raises:
        ConfigError: Unknown key, wrong type, value out of range, missing or malformed file.
    """
    data = _read_yaml(path) if path is not None else {}
    for word in overrides:
        key, value = _parse_override(word)
        _set_dotted(data, key, value)
    try:
        cfg = _build(cls, data)
        validate(cfg)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise
    return cfg


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build and validate a config tree from a nested dict (e.g. one stored in a checkpoint).

    Args:
        cls: The root dataclass.
        data: Nested ``{key: value}``; missing keys take their defaults.
        prefix: Prepended to key names in error messages (e.g. ``"model_config."``).

    Raises:
        ConfigError: Unknown key, wrong type or value out of range.
    """
    cfg = _build(cls, dict(data), prefix)
    validate(cfg, prefix)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML atomically (temporary name, then rename)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Return ``(dotted key, default, help)`` for every leaf of the config tree."""
    rows: list[tuple[str, str, str]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
        shown = repr(to_dict(default) if dataclasses.is_dataclass(default) else default)
        allowed = bounds_of(f).describe()
        kind = f"{_type_name(tp)}, {allowed}" if allowed else _type_name(tp)
        rows.append((prefix + f.name, shown, f"{f.metadata.get('help', '')} [{kind}]"))
    return rows


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    doc: str | None = None,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
    config_dir: Path | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse an entry script's command line: ``--config FILE`` then ``dotted.key=value`` words.

    Also accepts ``--local_rank`` / ``--local-rank`` appended by the DeepSpeed launcher.

    Args:
        cls: The root config dataclass.
        argv: Arguments (default ``sys.argv[1:]``).
        doc: Text shown at the top of ``--help`` (usually the script's docstring).
        add_flags: Adds the script's own flags to the parser.
        config_dir: Folder of shipped configs: ``--config NAME`` (``debug``, ``debug.yaml``) that is not
            an existing path is looked up there.

    Returns:
        ``(config, namespace)``; the namespace holds ``config``, ``local_rank`` and the script's flags.

    Raises:
        SystemExit: On a ConfigError (the one-line message is printed to stderr) or ``--help``.
    """
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    epilog = "config keys (override as key=value):\n" + "\n".join(
        f"  {k:<{width}}  {d:<14} {h}" for k, d, h in rows
    )
    parser = argparse.ArgumentParser(
        description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shipped = f"; shipped: {', '.join(sorted(p.stem for p in config_dir.glob('*.yaml')))}" if config_dir else ""
    parser.add_argument("--config", default=None, help=f"YAML config file, or the name of a shipped one{shipped}")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if add_flags is not None:
        add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.config is not None and config_dir is not None and not Path(args.config).exists():
        for name in (args.config, f"{args.config}.yaml"):
            if "/" not in name and (config_dir / name).is_file():
                args.config = str(config_dir / name)
                break
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    return cfg, args
