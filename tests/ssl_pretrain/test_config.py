"""Config trees: YAML + dotted overrides, types, validation messages, --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from ssl_pretrain.config import ConfigError, flatten, load_config, option, parse_config, save_config


@dataclass
class Train:
    lr: float = option(1e-3, "peak learning rate", gt=0)
    max_steps: int = option(10, "optimizer steps")
    optimizer: Literal["adamw", "lamb"] = option("adamw", "optimizer")
    widths: tuple[int, ...] = option((8, 16), "channel widths")


@dataclass
class Run:
    out_dir: str = option("runs/x", "output directory")
    init: str | None = option(None, "init")
    train: Train = option(factory=Train, help="optimisation")


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out_dir: runs/a\ntrain:\n  lr: 1e-2\n  widths: [4, 8, 16]\n")
    cfg = load_config(Run, f, ["train.max_steps=5", "init=runs:/abc/model"])
    assert cfg.out_dir == "runs/a"
    assert cfg.train.lr == pytest.approx(1e-2)  # YAML 1.1 reads 1e-2 as a string: converted
    assert cfg.train.widths == (4, 8, 16)
    assert cfg.train.max_steps == 5
    assert cfg.init == "runs:/abc/model"
    assert flatten(cfg)["train.widths"] == [4, 8, 16]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.max_steps=abc", "train.max_steps: expected int"),
        ("train.optimizer=sgd", "train.optimizer: must be one of 'adamw', 'lamb'"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train=3", "train: expected a mapping"),
        ("noequals", "noequals: expected a dotted.key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        load_config(Run, None, [override])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 1, max_steps: 'x'}\n")
    with pytest.raises(ConfigError, match="bad.yaml: train.max_steps: expected int"):
        load_config(Run, bad)


def test_save_roundtrip(tmp_path):
    cfg = load_config(Run, None, ["train.widths=[2,4]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Run, path) == cfg


def test_parse_config_accepts_launcher_flags(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("")
    argv = ["--local_rank=1", "out_dir=o", "--config", str(tmp_path / "c.yaml"), "train.lr=0.5"]
    cfg, args = parse_config(Run, argv)
    assert (cfg.out_dir, cfg.train.lr, args.local_rank) == ("o", 0.5, 1)
    with pytest.raises(SystemExit) as e:
        parse_config(Run, ["train.bogus=1"])
    assert e.value.code == 2
    assert "error: train.bogus: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Run, ["--help"])
    out = capsys.readouterr().out
    assert "train.max_steps" in out and "optimizer steps" in out


@dataclass
class Checked:
    n: int = option(1, "a count")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Holder:
    data: Checked = option(factory=Checked, help="checked in __post_init__")


def test_post_init_errors_become_config_errors():
    with pytest.raises(ConfigError, match="data: n must be >= 1, got 0"):
        load_config(Holder, None, ["data.n=0"])
