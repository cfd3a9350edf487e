"""Segment NIfTI volumes with a finetuned model; masks keep the input's grid, shape and affine.

One volume, or every ``.nii``/``.nii.gz`` of a folder (progress bar; ``<name>_mask.nii.gz`` each)::

    python launch/predict.py --model runs/ft/model.pt --input case_001.nii.gz --output case_001_mask.nii.gz
    python launch/predict.py --model models:/mri-ssl-syntheticliver@champion --input scans/ --output masks/
    python launch/predict.py --model runs/s0/model.pt --model runs/s1/model.pt --tta --largest-component \
        --save-probabilities --input scans/ --output masks/    # ensemble of two seeds, mirrored

``--model`` is a finetuned ``model.pt`` or an MLflow URI (``runs:/…``, ``models:/<name>@<alias>``;
the tracking store is ``MLFLOW_TRACKING_URI``). Every slice is segmented whole, by Gaussian-weighted
sliding windows of the model's patch size (``--overlap``), and mapped back to the input's grid.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ssl_pretrain.fileio import os_error_line


def main(argv: list[str] | None = None) -> int:
    """Parse flags, predict, print the written files. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, action="append",
                        help="finetuned model.pt or MLflow URI; repeat it for an ensemble (probabilities averaged)")
    parser.add_argument("--input", required=True, help=".nii/.nii.gz file or folder of them")
    parser.add_argument("--output", required=True, help="output .nii.gz (one input) or folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    parser.add_argument("--batch-size", type=int, default=16, help="slices (and windows) per forward pass")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="overlap of the Gaussian-weighted sliding windows (model patch size), in [0, 1)")
    parser.add_argument("--tta", nargs="?", const="all", default=None, metavar="AXES",
                        help="mirroring test-time augmentation over h (rows), w (columns) and, 3D models, d (slices); "
                        "default: every axis of the model")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <name>_probabilities.nii.gz: (X, Y, Z, K) softmax on the input's grid")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep the largest connected component of the classes chosen on validation")
    args = parser.parse_args(argv)
    from downstream.predict import predict

    try:
        written = predict(args.model, args.input, args.output, device=args.device, batch_size=args.batch_size,
                          overlap=args.overlap, tta=args.tta, save_probabilities=args.save_probabilities,
                          largest_component=args.largest_component)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk: one line
        print(f"error: {os_error_line(e, args.output)}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
