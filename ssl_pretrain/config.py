"""Typed configuration trees: dataclasses loaded from YAML with dotted command-line overrides.

Every entry point (`launch/pretrain.py`, `launch/finetune.py`, `launch/sweep.py`) owns one tree of
dataclasses. Fields are declared with :func:`option`, which keeps a one-line help text next to the
default; ``--help`` lists every key with its default and help. Values are checked against the
field types and each dataclass may add a ``validate()`` method; every problem is reported as one
:class:`ConfigError` line that names the key (and the file) and what is allowed.

Example:
    >>> @dataclass
    ... class Train:
    ...     lr: float = option(1e-3, "peak learning rate")
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
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ssl_pretrain.fileio import atomic_write_text

T = TypeVar("T")

__all__ = [
    "ConfigError", "option", "from_dict", "load_config", "parse_config", "save_config", "to_dict", "flatten",
]


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used; the message names it."""


_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """Declare a config field with its default and a one-line help text.

    Args:
        default: The default value (immutable: int, float, str, bool, tuple, None).
        help: One line shown by ``--help``.
        factory: Builds the default for mutable values and nested dataclasses.
    """
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is _MISSING:
        raise TypeError("option() needs a default or a factory")
    return dataclasses.field(default=default, metadata=meta)


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


def _validate(cfg: Any, prefix: str = "") -> None:
    """Call ``validate()`` on every dataclass of the tree, children first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, prefix + f.name + ".")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()


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
        _validate(cfg)
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
    _validate(cfg)
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
        rows.append((prefix + f.name, shown, f"{f.metadata.get('help', '')} [{_type_name(tp)}]"))
    return rows


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    doc: str | None = None,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse an entry script's command line: ``--config FILE`` then ``dotted.key=value`` words.

    Also accepts ``--local_rank`` / ``--local-rank`` appended by the DeepSpeed launcher.

    Args:
        cls: The root config dataclass.
        argv: Arguments (default ``sys.argv[1:]``).
        doc: Text shown at the top of ``--help`` (usually the script's docstring).
        add_flags: Adds the script's own flags to the parser.

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
    parser.add_argument("--config", default=None, help="YAML config file (e.g. launch/configs/debug.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if add_flags is not None:
        add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    return cfg, args
