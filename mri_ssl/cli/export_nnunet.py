"""Hand an mri-ssl 3D export to nnU-Net v2: plans with the export's architecture and weights nnU-Net loads.

First let nnU-Net plan and preprocess the target dataset as usual, then::

    nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres
    python launch/export_nnunet.py --model runs/m1/export/model.pt \\
        --plans $nnUNet_preprocessed/Dataset501_Liver/nnUNetPlans.json
    nnUNetv2_train 501 3d_fullres 0 -p nnUNetPlans_mrissl \\
        -pretrained_weights $nnUNet_preprocessed/Dataset501_Liver/nnUNetPlans_mrissl_pretrained.pth

``--model`` is an export ``model.pt`` or an MLflow URI. The written plans (``<plans-name>.json``) are nnU-Net's
with the configuration's architecture replaced by the export's (patch size rounded up to its strides; spacing,
normalisation, batch size and the preprocessed data stay nnU-Net's, so nothing is preprocessed again); the
weights file holds the export's encoder (and decoder, when it has one) under the network's own keys, loaded by
nnU-Net's ``load_pretrained_weights`` (the segmentation layers always start new). ``--plans-out`` defaults to the
folder of ``--plans``, where ``nnUNetv2_train -p`` looks for plans. Needs ``pip install -e ".[nnunet]"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ssl_pretrain.fileio import atomic_path, atomic_write_text, os_error_line


def main(argv: list[str] | None = None) -> int:
    """Parse flags, write the plans and weights, print them and the nnU-Net command. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a 3D mri-ssl export model.pt or an MLflow URI")
    parser.add_argument("--plans", required=True, help="nnU-Net's plans of the target dataset (nnUNetPlans.json)")
    parser.add_argument("--configuration", default="3d_fullres", help="the plans' configuration to give the export")
    parser.add_argument("--plans-out", default=None, help="folder of the written files (default: the --plans folder)")
    parser.add_argument("--plans-name", default="nnUNetPlans_mrissl", help="identifier of the written plans (-p)")
    args = parser.parse_args(argv)
    try:
        written = export_nnunet(args.model, Path(args.plans), args.configuration,
                                Path(args.plans_out) if args.plans_out else None, args.plans_name)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_line(e, args.plans_out or args.plans)}", file=sys.stderr)
        return 1
    plans_file, weights = written
    print(plans_file)
    print(weights)
    plans = json.loads(plans_file.read_text())
    print(f"next: nnUNetv2_train {plans['dataset_name']} {args.configuration} FOLD -p {args.plans_name} "
          f"-pretrained_weights {weights}")
    return 0


def export_nnunet(model: str, plans_path: Path, configuration: str, out: Path | None,
                  plans_name: str) -> tuple[Path, Path]:
    """Write ``<plans_name>.json`` and ``<plans_name>_pretrained.pth`` (see the module docstring).

    Raises:
        ValueError: an unreadable plans file or export, a 2D export, a configuration the plans lack, a plans
            name that would replace the planner's own file, or channels that differ from the dataset's.
    """
    from downstream.model_refs import local_model_file
    from ssl_pretrain.export import load_export
    from ssl_pretrain.nnunet import nnunet_checkpoint, plans_for_export

    try:
        plans = json.loads(plans_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--plans: {plans_path} is not a readable nnU-Net plans file ({e})") from None
    dataset_json = plans_path.parent / "dataset.json"
    if not dataset_json.is_file():
        raise ValueError(f"--plans: {plans_path.parent} has no dataset.json (nnU-Net copies it beside its plans)")
    channels = len(json.loads(dataset_json.read_text())["channel_names"])
    out = out or plans_path.parent
    if (out / f"{plans_name}.json").resolve() == plans_path.resolve():
        raise ValueError(f"--plans-name: {plans_name} would replace the planner's own {plans_path}")
    with local_model_file(model) as path:
        export = load_export(path)
    new = plans_for_export(plans, export, configuration, plans_name, source=model)
    ckpt = nnunet_checkpoint(export, new, configuration, input_channels=channels, source=model)
    out.mkdir(parents=True, exist_ok=True)
    plans_file, weights = out / f"{plans_name}.json", out / f"{plans_name}_pretrained.pth"
    with atomic_path(weights) as tmp:
        torch.save(ckpt, tmp)
    atomic_write_text(plans_file, json.dumps(new, indent=4))
    logging.getLogger(__name__).info("%s: %d tensors from the export, %d from nnU-Net's own initialisation",
                                     model, ckpt["mri_ssl"]["loaded"], ckpt["mri_ssl"]["from_nnunet_init"])
    return plans_file, weights


if __name__ == "__main__":
    sys.exit(main())
