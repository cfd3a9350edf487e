"""Preprocessing: parameters, normalisation, RAS reorientation, display convention, inverse mapping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import blob_volume, save

from ssl_pretrain.config import ConfigError, validate
from ssl_pretrain.data.preprocess import InputError, PreprocessParams, preprocess, to_original_grid


def test_params_roundtrip_and_validation() -> None:
    p = PreprocessParams(spacing=(1.0, 2.0), size=(32, 48), norm="minmax", clip=(1.0, 99.0), channels=(1, 0))
    d = json.loads(json.dumps(p.to_dict()))
    assert PreprocessParams.from_dict(d) == p
    with pytest.raises(ValueError, match="preprocess.spacng: unknown key"):
        PreprocessParams.from_dict({"spacng": [1, 1]})
    with pytest.raises(ValueError, match="preprocess.norm"):
        PreprocessParams.from_dict({"norm": "robust"})
    with pytest.raises(ConfigError, match="preprocess.size"):
        PreprocessParams.from_dict({"size": [0, 32]})
    with pytest.raises(ConfigError, match=r"preprocess.size\[0\]: expected int, got 16.5"):
        PreprocessParams.from_dict({"size": [16.5, 32]})
    with pytest.raises(ConfigError, match="preprocess.clip"):
        validate(PreprocessParams(clip=(99.0, 1.0)), "preprocess.")
    with pytest.raises(ConfigError, match="preprocess: expected a mapping"):
        PreprocessParams.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["zscore", "minmax"])
def test_shapes_dtypes_and_normalisation(tmp_path: Path, norm: str) -> None:
    img, lab = blob_volume(0, 7)
    save(tmp_path / "i.nii.gz", img)
    save(tmp_path / "l.nii.gz", lab)
    vol = preprocess(tmp_path / "i.nii.gz", PreprocessParams(spacing=(2.5, 2.0), size=(20, 24), norm=norm),
                     tmp_path / "l.nii.gz", allowed_labels=(0, 1))
    assert vol.image.shape == (7, 1, 20, 24) and vol.image.dtype == np.float32
    assert vol.label is not None and vol.label.shape == (7, 20, 24) and vol.label.dtype == np.uint8
    assert vol.label.sum() == lab.sum()  # native spacing and size: nothing resampled or cropped
    assert vol.spacing == pytest.approx((2.0, 2.5, 6.0))
    if norm == "zscore":
        assert abs(vol.image.mean()) < 1e-3 and vol.image.std() == pytest.approx(1.0, abs=1e-3)
    else:
        assert vol.image.min() == pytest.approx(0.0) and vol.image.max() == pytest.approx(1.0)
    json.dumps(vol.geometry)


def _marker_volume() -> np.ndarray:
    """A RAS-ordered (X=16, Y=12, Z=5) volume with a bright voxel at patient right-anterior, slice 1."""
    vol = np.ones((16, 12, 5), dtype=np.float32)
    vol[2, 9, 1] = 50.0  # x small = patient right, y large = anterior
    vol[10, 3, 3] = 20.0
    return vol


def test_reorientation_and_display_convention(tmp_path: Path) -> None:
    ras = _marker_volume()
    save(tmp_path / "ras.nii", ras, np.diag([1.0, 1.0, 3.0, 1.0]))
    # the same anatomy stored LPS and with permuted axes (z, x, y)
    lps = ras[::-1, ::-1, :]
    aff_lps = np.array([[-1.0, 0, 0, 15], [0, -1, 0, 11], [0, 0, 3, 0], [0, 0, 0, 1]])
    save(tmp_path / "lps.nii", np.ascontiguousarray(lps), aff_lps)
    perm = np.ascontiguousarray(ras.transpose(2, 0, 1))
    aff_perm = np.array([[0.0, 1, 0, 0], [0, 0, 1, 0], [3, 0, 0, 0], [0, 0, 0, 1]])
    save(tmp_path / "perm.nii", perm, aff_perm)
    params = PreprocessParams(spacing=(1.0, 1.0), size=(12, 16), clip=(0.0, 100.0), norm="minmax")
    outs = [preprocess(tmp_path / f, params) for f in ("ras.nii", "lps.nii", "perm.nii")]
    for v in outs[1:]:
        np.testing.assert_allclose(v.image, outs[0].image, atol=1e-6)
    img = outs[0].image[:, 0]
    # slice 1, top rows = anterior, left columns = patient right (radiological view)
    s, h, w = np.unravel_index(np.argmax(img), img.shape)
    assert (s, h, w) == (1, 12 - 1 - 9, 2)


@pytest.mark.parametrize("size", [(30, 28), (14, 10)])  # pad and crop
def test_to_original_grid_inverts_geometry_exactly(tmp_path: Path, size: tuple[int, int]) -> None:
    img, lab = blob_volume(3, 6)
    aff = np.array([[0.0, 0, 6, 0], [-2.0, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 0, 1]])  # oblique axis order
    lab = np.ascontiguousarray(lab.transpose(2, 0, 1))
    save(tmp_path / "i.nii.gz", np.ascontiguousarray(img.transpose(2, 0, 1)), aff)
    save(tmp_path / "l.nii.gz", lab, aff)
    vol = preprocess(tmp_path / "i.nii.gz", PreprocessParams(spacing=(2.5, 2.0), size=size), tmp_path / "l.nii.gz")
    back = to_original_grid(vol.label, vol.geometry)
    assert back.shape == lab.shape and back.dtype == np.uint8
    if size == (30, 28):
        np.testing.assert_array_equal(back, lab)
    else:  # cropped: everything inside the kept window comes back, nothing outside
        assert back.sum() <= lab.sum() and np.all(back <= lab) and back.sum() > 0.5 * lab.sum()


def test_to_original_grid_after_resampling(tmp_path: Path) -> None:
    img, lab = blob_volume(4, 6, shape_xy=(48, 40))
    save(tmp_path / "i.nii.gz", img)
    save(tmp_path / "l.nii.gz", lab)
    vol = preprocess(tmp_path / "i.nii.gz", PreprocessParams(spacing=(3.1, 3.7), size=(32, 32)), tmp_path / "l.nii.gz")
    assert vol.spacing[0] == pytest.approx(3.7, rel=0.05) and vol.spacing[1] == pytest.approx(3.1, rel=0.05)
    # the three spacing orders: params (H, W), Volume.spacing (x, y, z), array_spacing (S, H, W)
    s, h, w = vol.array_spacing
    assert s == 6.0 and h == pytest.approx(3.1, rel=0.05) and w == pytest.approx(3.7, rel=0.05)
    assert (w, h, s) == vol.spacing
    back = to_original_grid(vol.label, vol.geometry)
    dice = 2 * (back & lab).sum() / (back.sum() + lab.sum())
    assert dice > 0.9
    with pytest.raises(ValueError, match="mask: shape"):
        to_original_grid(vol.label[:, :5], vol.geometry)


def test_4d_channels_kept_or_selected(tmp_path: Path) -> None:
    img, _ = blob_volume(5, 5)
    four = np.stack([img, (img.max() - img)], axis=-1)
    save(tmp_path / "mc.nii.gz", four)
    params = PreprocessParams(spacing=(2.5, 2.0), size=(20, 24))
    both = preprocess(tmp_path / "mc.nii.gz", params)
    assert both.image.shape == (5, 2, 20, 24)
    second = preprocess(tmp_path / "mc.nii.gz", PreprocessParams(**{**params.__dict__, "channels": (1,)}))
    np.testing.assert_allclose(second.image[:, 0], both.image[:, 1])
    with pytest.raises(InputError, match=r"mc.nii.gz: channel\(s\) \[4\]"):
        preprocess(tmp_path / "mc.nii.gz", PreprocessParams(**{**params.__dict__, "channels": (4,)}))


def test_load_reads_whole_gzip(tmp_path: Path) -> None:
    """A flipped byte deep inside the gzip stream fails at load (CRC or inflate), not later."""
    img, _ = blob_volume(6, 5)
    p = save(tmp_path / "i.nii.gz", img)
    raw = bytearray(p.read_bytes())
    raw[-12] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="i.nii.gz: corrupt or truncated gzip"):
        preprocess(p, PreprocessParams())
    assert nib.load(p).shape == (24, 20, 5)  # nibabel alone only reads the header


def test_a_sagittal_acquisition_is_sliced_as_acquired_or_resliced_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26.13: 8 sagittal slices of 4 mm (file axis 0 = patient x) with 0.8 mm in-plane voxels."""
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (8, 40, 30)).astype(np.float32)  # (x: 8 × 4 mm, y: 40 × 0.8, z: 30 × 0.8)
    lab = np.zeros(img.shape, np.uint8)
    lab[2:6, 10:25, 5:20] = 1
    img[lab == 1] += 60
    affine = np.diag([4.0, 0.8, 0.8, 1.0])
    save(tmp_path / "sag.nii.gz", img, affine)
    save(tmp_path / "sag_label.nii.gz", lab, affine)
    params = PreprocessParams(spacing=(0.8, 0.8), size=(48, 48), field_of_view="pad")
    with caplog.at_level("WARNING"):
        axial = preprocess(tmp_path / "sag.nii.gz", params, tmp_path / "sag_label.nii.gz")
    assert "sag.nii.gz: a sagittal acquisition (4 mm slices) is resliced axially" in caplog.text
    assert axial.image.shape[0] == 30  # one slice per z voxel, each interpolated along x from 4 mm
    caplog.clear()
    own = dataclasses.replace(params, slice_axis="acquisition")
    with caplog.at_level("WARNING"):
        vol = preprocess(tmp_path / "sag.nii.gz", own, tmp_path / "sag_label.nii.gz")
    assert "resliced" not in caplog.text
    assert vol.image.shape[0] == 8 and vol.spacing[2] == pytest.approx(4.0)  # the 8 acquired slices
    assert vol.label[:, 0, :].sum() == 0 and vol.label.sum() == lab.sum()  # superior up, nothing interpolated
    np.testing.assert_array_equal(to_original_grid(vol.label, vol.geometry), lab)  # and back to the file's grid
