"""A fixed split (``data.splits``) in a finetuning run: honoured, written to ``out_dir`` and logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from downstream.config import FinetuneConfig
from downstream.data import open_labeled
from downstream.finetune import finetune
from ssl_pretrain.config import load_config
from ssl_pretrain.tracking import start_logger

from .conftest import tiny_overrides


def test_finetune_tests_on_the_splits_file(cohort: Path, tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    ids = [s.id for s in open_labeled(cohort).subjects]
    # a test set the seeded split (split_seed=0) would not pick, of a size n_test does not say
    fixed = {"train_pool": ids[:3], "val": ids[3:5], "test": ids[5:]}
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(fixed))
    out = tmp_path / "run"
    cfg = load_config(FinetuneConfig, overrides=[*tiny_overrides(cohort, out, size=32), f"data.splits={path}",
                                                 "n_labeled=2", "tracking.enabled=true", "train.max_steps=10"])
    logger = start_logger(True, cfg.tracking.experiment, run_name="fixed-split")
    try:
        result = finetune(cfg, logger=logger)
    finally:
        logger.end()
    assert result["test_ids"] == sorted(ids[5:]) and sorted(result["test_per_volume"]) == sorted(ids[5:])
    assert result["val_ids"] == sorted(ids[3:5]) and set(result["train_ids"]) <= set(ids[:3])
    assert json.loads((out / "splits.json").read_text()) == {k: sorted(v) for k, v in fixed.items()}
    run = mlflow.search_runs(experiment_names=["mri-ssl/finetune"], output_format="list")[0]
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "splits.json" in names



def test_sweep_trials_receive_the_splits_file_as_an_absolute_path(cohort: Path, tmp_path: Path, monkeypatch) -> None:
    from downstream.config import SweepConfig
    from downstream.sweep import InitSpec, _check_data, _space, _trial_config

    ids = [s.id for s in open_labeled(cohort).subjects]
    (tmp_path / "splits.json").write_text(json.dumps({"train_pool": ids[:3], "val": ids[3:5], "test": ids[5:]}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SweepConfig, overrides=[*tiny_overrides(cohort, tmp_path / "sw", size=32),
                                              "data.splits=splits.json", "n_labeled=[1, 3]"])
    specs = [InitSpec("random", "random", "random", "random", {}, cfg.data.preprocess.to_dict())]
    _check_data(cfg, specs)  # checks n_labeled against the file's pool and writes the split used
    assert json.loads((tmp_path / "sw" / "splits.json").read_text())["test"] == sorted(ids[5:])
    space = _space(cfg, specs, {"out_root": str(tmp_path / "sw")})
    config = {**space, "init": {"index": 0, "tag": "random", "local": "random", "preprocess": specs[0].params},
              "n_labeled": 1, "seed": 0, "lr": 1e-3, "weight_decay": 1e-4}
    trial, _ = _trial_config(config)
    assert trial.data.splits == str(tmp_path / "splits.json")
    bad = load_config(SweepConfig, overrides=[*tiny_overrides(cohort, tmp_path / "sw2", size=32),
                                              "data.splits=splits.json", "n_labeled=[4]"])
    with pytest.raises(ValueError, match="n_labeled: 4 is larger than the training pool of 3"):
        _check_data(bad, specs)


def test_transfer_is_a_searched_trial_key(cohort: Path, tmp_path: Path) -> None:
    from downstream.config import SweepConfig
    from downstream.sweep import InitSpec, _space, _trial_config, trial_key
    from ssl_pretrain.config import ConfigError

    cfg = load_config(SweepConfig, overrides=[*tiny_overrides(cohort, tmp_path / "sw", size=32),
                                              "search.transfer=[encoder, encoder+decoder]"])
    specs = [InitSpec("random", "random", "random", "random", {}, cfg.data.preprocess.to_dict())]
    space = _space(cfg, specs, {"out_root": str(tmp_path / "sw")})
    assert space["transfer"] == {"grid_search": ["encoder", "encoder+decoder"]}
    keys = set()
    for transfer in ("encoder", "encoder+decoder"):
        config = {**space, "init": {"index": 0, "tag": "c", "local": "random", "preprocess": specs[0].params},
                  "n_labeled": 1, "seed": 0, "lr": 1e-3, "weight_decay": 1e-4, "transfer": transfer}
        trial, key = _trial_config(config)
        assert trial.transfer == transfer
        keys.add(key)
    assert len(keys) == 2 and trial_key("c", 1, 0, 1e-3, 1e-4) in keys  # the default keeps its old name
    with pytest.raises(ConfigError, match="search.transfer"):
        load_config(SweepConfig, overrides=[*tiny_overrides(cohort, tmp_path / "sw", size=32),
                                            "search.transfer=[decoder]"])
