"""A fixed split (``data.splits``) in a finetuning run: honoured, written to ``out_dir`` and logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

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

