"""The one logging interface: MLflow on rank 0, a no-op everywhere else.

Training code talks to a :class:`RunLogger` and never imports mlflow itself. Rank 0 gets an
:class:`MLflowLogger` (mlflow is imported lazily, so workers and tests that do not track never pay
for it); every other rank, and any caller that passes ``enabled=False``, gets a
:class:`NullLogger`. The tracking store is whatever ``MLFLOW_TRACKING_URI`` names; with nothing
set it is MLflow's own local default (a SQLite file in the working directory).

Example:
    >>> with start_logger(enabled=False, experiment="mri-ssl/pretrain") as log:
    ...     log.log_metrics({"loss": 0.5}, step=1)
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["RunLogger", "NullLogger", "MLflowLogger", "start_logger"]

# MLflow limits a param value to 6000 characters; long values (lists of paths) are cut.
_MAX_PARAM_CHARS = 6000


class RunLogger:
    """What training code may log. The base class is the no-op logger."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log run parameters (a flat ``{dotted.key: value}`` dict)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step``."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's files) under ``artifact_path``."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact (e.g. ``"plots/loss.png"``)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullLogger(RunLogger):
    """Logs nothing: non-zero ranks, tests and runs with tracking switched off."""


class MLflowLogger(RunLogger):
    """Logs to one MLflow run, created (or resumed) on construction.

    Args:
        experiment: Experiment name, created when missing (e.g. ``"mri-ssl/pretrain"``).
        run_name: Display name of the run.
        tags: Tags set at creation.
        parent_run_id: Makes this a nested run of that parent (sweeps).
        run_id: Resume this existing run instead of creating one.
        tracking_uri: Overrides ``MLFLOW_TRACKING_URI`` (trials in other processes pass the parent's).
    """

    def __init__(
        self,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
        self._ended = False
        if run_id is not None:  # resume: the run continues, with its old params and metrics
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            self.set_tags(tags or {})
        else:
            exp = self._client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
            all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self._client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        log.info("MLflow run %s at %s", self.run_id, self._client.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        name = Path(artifact_file)
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / name.name
            figure.savefig(local, dpi=100, bbox_inches="tight")
            self.log_artifact(local, str(name.parent) if str(name.parent) != "." else None)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, str(k), str(v))

    def end(self, status: str = "FINISHED") -> None:
        if not self._ended:
            self._client.set_terminated(self.run_id, status=status)
            self._ended = True


def start_logger(
    enabled: bool,
    experiment: str,
    *,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> RunLogger:
    """Return an :class:`MLflowLogger` when ``enabled`` (rank 0), else a :class:`NullLogger`."""
    if not enabled:
        return NullLogger()
    return MLflowLogger(
        experiment,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
        run_id=run_id,
        tracking_uri=tracking_uri,
    )
