"""The config schema of every entry point: bounds declared on every numeric field, each bound checked
once by the loader under the dotted key the user typed, shipped YAMLs that only override, --help
generated from the schema."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml

from downstream.config import FinetuneConfig, SweepConfig
from ssl_pretrain.config import ConfigError, bounds_of, describe, flatten, load_config, parse_config
from ssl_pretrain.engine.config import PretrainConfig

ROOTS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "sweep": SweepConfig}
CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"
SHIPPED = {"debug": PretrainConfig, "contrastive": PretrainConfig, "regression": PretrainConfig,
           "debug3d": PretrainConfig, "mae3d": PretrainConfig, "contrastive3d": PretrainConfig,
           "finetune": FinetuneConfig, "sweep": SweepConfig, "sweep_debug": SweepConfig,
           "finetune3d": FinetuneConfig, "sweep3d": SweepConfig, "sweep_debug3d": SweepConfig}


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """``(int | float | other, is_list)`` of a field type, unwrapping Optional and list/tuple."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (tp, False)
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return (args[0] if args else Any), True
    return tp, False


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any, type]]:
    """``(dotted key, field, type, owning class)`` for every leaf of a config tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp, cls))
    return out


ALL_LEAVES = [(root, *leaf) for root, cls in ROOTS.items() for leaf in _leaves(cls)]


def test_every_numeric_field_has_bounds_or_says_why_not() -> None:
    missing = []
    for root, key, f, tp, _ in ALL_LEAVES:
        scalar, _ = _scalar_type(tp)
        if scalar not in (int, float):
            continue
        b = bounds_of(f)
        declared = any(v is not None for v in (b.ge, b.gt, b.le, b.lt, b.choices))
        if not declared and not b.unbounded:
            missing.append(f"{root}: {key}")
    assert not missing, f"numeric fields without bounds or a reason: {missing}"


def _bad_values(f: dataclasses.Field, tp: Any) -> list[Any]:
    """The first value outside each of the field's bounds (a list for a list field)."""
    scalar, is_list = _scalar_type(tp)
    b = bounds_of(f)
    step = (lambda x, d: x + d) if scalar is int else (lambda x, d: math.nextafter(x, d * math.inf))
    singles = []
    if b.ge is not None:
        singles.append(step(b.ge, -1))
    if b.gt is not None:
        singles.append(b.gt)
    if b.le is not None:
        singles.append(step(b.le, 1))
    if b.lt is not None:
        singles.append(b.lt)
    if b.choices is not None:
        singles.append(max(b.choices) + 1 if scalar is int else "no-such-choice")
    if not is_list:
        return singles
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    base = list(default or [])
    lo = b.length[0] if b.length else 1
    base = (base + base[:1] * lo)[: max(lo, len(base))] if base else []
    values = [[v, *base[1:]] for v in singles]
    if b.length is not None:
        a, z = b.length
        if a > 0:
            values.append(base[: a - 1])
        if z is not None:
            values.append((base * (z + 1))[: z + 1])
    return values


BOUNDED = [(root, key, f, tp) for root, key, f, tp, _ in ALL_LEAVES if _bad_values(f, tp)]


@pytest.mark.parametrize(("root", "key", "field", "tp"), BOUNDED, ids=[f"{r}:{k}" for r, k, _, _ in BOUNDED])
def test_each_bound_names_the_dotted_key_in_one_line(root: str, key: str, field: Any, tp: Any) -> None:
    for bad in _bad_values(field, tp):
        word = f"{key}={yaml.safe_dump(bad, default_flow_style=True).strip().removesuffix('...').strip()}"
        with pytest.raises(ConfigError) as e:
            load_config(ROOTS[root], overrides=[word])
        msg = str(e.value)
        assert msg.startswith(f"{key}: ") or msg.startswith(f"{key}["), (word, msg)
        assert "\n" not in msg


def test_bounds_keep_their_valid_edges() -> None:
    """A positive control: the edge values themselves are accepted."""
    cfg = load_config(FinetuneConfig, overrides=["train.aug.p_flip=1.0", "train.sw_overlap=0.0", "data.n_val=1",
                                                 "train.pretrained_lr_scale=0"])
    assert (cfg.train.aug.p_flip, cfg.train.sw_overlap, cfg.data.n_val) == (1.0, 0.0, 1)
    with pytest.raises(ConfigError, match=r"^train\.sw_overlap: must be in \[0, 1\), got 1\.0$"):
        load_config(FinetuneConfig, overrides=["train.sw_overlap=1.0"])
    with pytest.raises(ConfigError, match=r"^data\.preprocess\.clip: \[60\.0, 40\.0\] must be percentiles"):
        load_config(FinetuneConfig, overrides=["data.preprocess.clip=[60, 40]"])


def test_no_config_class_hand_writes_range_checks() -> None:
    """Range checks live in option(); a class may only add cross-field rules (check_fields)."""
    for _, cls in ROOTS.items():
        for _, _, _, owner in _leaves(cls):
            assert not hasattr(owner, "validate"), f"{owner.__name__} still has a hand-written validate()"


def test_every_shipped_config_is_checked() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_only_override(name: str) -> None:
    cls = SHIPPED[name]
    defaults = flatten(cls())
    data = flatten(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    loaded = flatten(load_config(cls, CONFIGS / f"{name}.yaml"))
    same = [k for k in data if k in defaults and loaded[k] == defaults[k]]
    assert not same, f"{name}.yaml restates defaults (defaults live in the dataclass): {same}"


def test_help_lists_every_key_with_default_type_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ROOTS.values():
        with pytest.raises(SystemExit):
            parse_config(cls, ["--help"])
        out = capsys.readouterr().out
        for key, default, _ in describe(cls):
            assert key in out and default in out
    rows = {k: h for k, _, h in describe(FinetuneConfig)}
    assert rows["train.sw_overlap"].endswith("[float, in [0, 1)]")
    assert rows["train.pretrained_lr_scale"].endswith("[float, >= 0]")
    assert dict((k, d) for k, d, _ in describe(FinetuneConfig))["train.pretrained_lr_scale"] == "0.3"
