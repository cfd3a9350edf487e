"""Downstream segmentation: finetuning, metrics, sweeps, reports, inference."""
