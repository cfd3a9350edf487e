"""What a pretraining run has done so far: the typed state every checkpoint saves and a resume restores.

The DeepSpeed engine saves the model, optimizer and schedule itself; the loader, the RNGs and the
task's generators are per-rank state (``rank-NNNNN.pt``). Everything else that a resumed run must
continue — the step, samples seen, wall time, last loss, the probe curve and its cost, the MLflow
run — is :class:`PretrainState`, written into each checkpoint's ``meta.json`` by
:meth:`PretrainState.state_dict` and read back by :meth:`PretrainState.load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PretrainState"]


@dataclass
class PretrainState:
    """The progress of one pretraining run (identical on every rank).

    Args:
        step: Optimizer steps taken.
        samples_seen: Samples over all ranks up to ``step``.
        wall_time_s: Seconds of training up to ``step``, over every attempt (resumes add up).
        loss: Mean loss over the ranks at ``step`` (NaN before the first step).
        probe_history: ``(step, probe Dice)`` of every probe so far (step 0: the random-init reference).
        probe_time_s: Seconds spent probing, over the whole run.
        mlflow_run_id: The run's MLflow run (a resume continues it), or None without tracking.
    """

    step: int = 0
    samples_seen: int = 0
    wall_time_s: float = 0.0
    loss: float = math.nan
    probe_history: list[tuple[int, float]] = field(default_factory=list)
    probe_time_s: float = 0.0
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able fields (``meta.json`` keys)."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "wall_time_s": self.wall_time_s,
            "loss": self.loss,
            "probe_history": [list(h) for h in self.probe_history],
            "probe_time_s": self.probe_time_s,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s keys (other keys of ``meta.json`` are ignored)."""
        self.step, self.samples_seen = int(d["step"]), int(d["samples_seen"])
        self.wall_time_s, self.loss = float(d["wall_time_s"]), float(d["loss"])
        self.probe_history = [(int(a), float(b)) for a, b in d.get("probe_history", [])]
        self.probe_time_s = float(d.get("probe_time_s", 0.0))
        self.mlflow_run_id = d.get("mlflow_run_id")
