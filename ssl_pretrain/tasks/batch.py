"""What a task's gathered loss needs to know about a batch at the end of an epoch.

In epoch mode (``data.mode=epoch``) every sample trains once: the trainer passes short batches as
they are and, on a rank whose batch holds only padding, one padding row (``valid`` False) so that
the rank still takes part in the step's collectives. ``batch["rank_sizes"]`` then lists the
samples of every rank; the trainer weights each rank's loss by its share of them. A per-sample
loss needs nothing more; a loss that gathers rows across ranks (NT-Xent's negatives) must gather
only the samples, which :func:`gathered_rows` says.
"""

from __future__ import annotations

from typing import Any

__all__ = ["gathered_rows"]


def gathered_rows(batch: dict[str, Any], per_sample: int = 1) -> tuple[int, list[int] | None]:
    """(this rank's rows that are samples, every rank's such rows) for a loss gathered across ranks.

    Args:
        batch: The micro batch (``rank_sizes`` set by the trainer in epoch mode).
        per_sample: Rows each sample contributes (e.g. sampled points per patch).

    Returns:
        ``(n, sizes)``: the first ``n`` rows are this rank's samples; ``sizes`` is every rank's ``n``
        (pass it to :func:`kernels.nt_xent`), None when every rank's rows are all samples.
    """
    sizes = batch.get("rank_sizes")
    if sizes is None:
        return batch["image"].shape[0] * per_sample, None
    n = int(batch["valid"].sum()) * per_sample
    return n, [m * per_sample for m in sizes]
