"""Volumetric preprocessing and 3D shards: the volume, its label and its crop box map back to the input grid."""

from __future__ import annotations

import io
import json
import tarfile

import nibabel as nib
import numpy as np
import pytest

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.preprocess import InputError, PreprocessParams
from ssl_pretrain.data.shards import write_shards
from ssl_pretrain.data.volumes import preprocess_volume, volume_to_original_grid


def _volume(tmp_path, name="s1", affine=None, shape=(20, 24, 12), seed=0):
    """A body (non-zero box) inside zero background, with a labeled blob, saved with ``affine``."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    img[3:17, 5:20, 2:10] = rng.uniform(1, 2, (14, 15, 8))
    lab = np.zeros(shape, np.uint8)
    lab[6:12, 8:15, 4:8] = 1
    affine = np.diag([1.5, 1.0, 3.0, 1.0]) if affine is None else affine
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    ip, lp = tmp_path / "images" / f"{name}.nii.gz", tmp_path / "labels" / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), ip)
    nib.save(nib.Nifti1Image(lab, affine), lp)
    return ip, lp, img, lab


# a non-RAS (LPS-like, axes permuted) anisotropic affine
LPS = np.array([[0.0, -1.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, 3.0, -7], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [None, LPS], ids=["ras", "permuted-lps"])
def test_volume_label_and_crop_box_round_trip_to_the_input_grid(tmp_path, affine):
    ip, lp, img, lab = _volume(tmp_path, affine=affine)
    zooms = nib.load(ip).header.get_zooms()
    ras = nib.orientations.io_orientation(nib.load(ip).affine)
    native = [0.0, 0.0, 0.0]  # the file's own voxel sizes in (z, y, x) order: no resampling
    for file_axis, (ras_axis, _) in enumerate(ras):
        native[2 - int(ras_axis)] = float(zooms[file_axis])
    vol = preprocess_volume(ip, PreprocessParams(spacing=tuple(native)), lp)
    assert vol.image.shape[0] == 1 and vol.image.shape[1:] == vol.label.shape
    assert vol.image.shape[1:] == tuple(b - a for a, b in vol.geometry["crop_box"])
    assert np.prod(vol.label.shape) == 14 * 15 * 8  # cropped to the body, not the field of view
    back = volume_to_original_grid(vol.label, vol.geometry)
    np.testing.assert_array_equal(back, lab)
    body = volume_to_original_grid(np.ones(vol.label.shape, np.uint8), vol.geometry)
    np.testing.assert_array_equal(body.astype(bool), img != 0)  # the crop box is the body's box


def test_resampled_volume_has_the_target_spacing_and_normalised_intensities(tmp_path):
    ip, lp, _, lab = _volume(tmp_path)  # 1.5 x 1.0 x 3.0 mm
    vol = preprocess_volume(ip, PreprocessParams(spacing=(1.5, 2.0, 1.5)), lp)
    d, h, w = vol.label.shape
    assert (d, h, w) == (round(8 * 3.0 / 1.5), round(15 * 1.0 / 2.0), round(14 * 1.5 / 1.5))
    assert vol.spacing == (1.5, 2.0, 1.5)
    assert abs(float(vol.image.mean())) < 1e-3 and abs(float(vol.image.std()) - 1) < 1e-2
    back = volume_to_original_grid(vol.label, vol.geometry)
    dice = 2 * (back & lab).sum() / (back.sum() + lab.sum())
    assert dice > 0.8  # a 6x7x4-voxel blob, nearest downsampled 2x in-plane and back
    fine = preprocess_volume(ip, PreprocessParams(spacing=(1.0, 0.5, 0.75)), lp)  # integer upsampling
    assert fine.label.shape == (24, 30, 28)
    np.testing.assert_array_equal(volume_to_original_grid(fine.label, fine.geometry), lab)  # exact inverse


def test_volume_errors_name_the_file_and_what_was_expected(tmp_path):
    ip, _, _, _ = _volume(tmp_path)
    with pytest.raises(InputError, match=r"s1.nii.gz: 48x60x84 voxels .* exceed --max-voxels 10000"):
        preprocess_volume(ip, PreprocessParams(spacing=(0.5, 0.25, 0.25)), max_voxels=100 * 100)
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), blank)
    with pytest.raises(InputError, match="blank.nii.gz: volume is constant"):
        preprocess_volume(blank, PreprocessParams(spacing=(1.0, 1.0, 1.0)))


def test_3d_shards_hold_one_volume_per_subject_with_its_crop_box(tmp_path):
    lines = []
    for i in range(3):
        ip, lp, _, _ = _volume(tmp_path, name=f"s{i}", seed=i)
        lines.append(f"{ip}\t{lp}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    subjects, skipped = discover(tmp_path / "list.txt")
    params = PreprocessParams(spacing=(3.0, 1.0, 1.5))
    manifest = write_shards(subjects, tmp_path / "shards", params, samples_per_shard=2, workers=1,
                            skipped=skipped, progress=False)
    assert manifest["layout"] == "volume" and manifest["num_samples"] == 3 and len(manifest["shards"]) == 2
    assert manifest["sample"]["image.npy"]["shape"] == [1, None, None, None]
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "shards" / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert sorted(samples) == ["s0", "s1", "s2"]
    for sid, parts in samples.items():
        image = np.load(io.BytesIO(parts["image.npy"]), allow_pickle=False)
        label = np.load(io.BytesIO(parts["label.npy"]), allow_pickle=False)
        meta = json.loads(parts["meta.json"])
        vol = preprocess_volume(tmp_path / "images" / f"{sid}.nii.gz", params, tmp_path / "labels" / f"{sid}.nii.gz")
        assert image.dtype == np.float16 and image.shape == vol.image.shape
        np.testing.assert_array_equal(image, vol.image.astype(np.float16))
        np.testing.assert_array_equal(label, vol.label)
        assert meta["crop_box"] == vol.geometry["crop_box"] and meta["shape"] == list(vol.label.shape)
        assert meta["spacing"] == [3.0, 1.0, 1.5] and meta["subject"] == sid
