"""The logging interface against a real (SQLite) MLflow store."""

from __future__ import annotations

import matplotlib.pyplot as plt
import mlflow
from mlflow.tracking import MlflowClient

from ssl_pretrain.tracking import NullLogger, start_logger


def test_null_logger_for_other_ranks():
    log = start_logger(enabled=False, experiment="x")
    assert isinstance(log, NullLogger) and log.run_id is None
    log.log_metrics({"a": 1.0}, step=1)
    log.end()


def test_mlflow_logger_logs_everything(mlflow_uri, tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")
    with start_logger(enabled=True, experiment="mri-ssl/test", run_name="r", tags={"task": "t"}) as log:
        log.log_params({f"k{i}": i for i in range(150)})  # more than one MLflow batch
        log.log_metrics({"loss": 0.5}, step=3)
        log.log_artifact(f)
        fig, ax = plt.subplots()
        ax.plot([1, 2])
        log.log_figure(fig, "plots/loss.png")
        plt.close(fig)
        parent = log.run_id
    child = start_logger(enabled=True, experiment="mri-ssl/test", parent_run_id=parent)
    child.end("FAILED")
    client = MlflowClient(mlflow.get_tracking_uri())
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "t"
    assert len(run.data.params) == 150 and run.data.metrics["loss"] == 0.5
    names = {a.path for a in client.list_artifacts(parent)} | {
        a.path for a in client.list_artifacts(parent, "plots")}
    assert {"config.yaml", "plots/loss.png"} <= names
    c = client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent and c.info.status == "FAILED"


def test_resumed_run_continues(mlflow_uri):
    first = start_logger(enabled=True, experiment="mri-ssl/test", tags={"task": "a"})
    first.log_metrics({"loss": 1.0}, step=1)
    first.end("KILLED")
    again = start_logger(enabled=True, experiment="mri-ssl/test", run_id=first.run_id, tags={"resumed": 1})
    again.log_metrics({"loss": 0.5}, step=2)
    again.end()
    client = MlflowClient(mlflow.get_tracking_uri())
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert [m.value for m in client.get_metric_history(first.run_id, "loss")] == [1.0, 0.5]
