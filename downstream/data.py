"""Labeled volumes for finetuning: discovery, validation, on-disk cache and subject-level splits.

A labeled dataset is an MSD-layout folder (``imagesTr/``, ``labelsTr/``, ``dataset.json`` with any
number of classes) or image/label folders with matching names (found by
``ssl_pretrain.data.ingest.discover``). Every volume goes through the one preprocessing function
of the project, with the parameters of the pretrained model's export when one is given, so
finetuning sees data prepared exactly like pretraining did.

Splits follow Chaitanya et al.: a fixed test set and a fixed validation set (drawn once with
``data.split_seed``), and a training pool from which ``n_labeled`` volumes are drawn by the run's
seed. The test set never depends on ``n_labeled``, the seed or the init, and the draw depends only
on (pool, ``n_labeled``, seed): every init of a sweep trains on the same volumes for the same seed,
which is what makes its comparisons paired. A splits file (``data.splits``: JSON with
``train_pool``, ``val`` and ``test`` lists of subject ids, as nnU-Net's ``splits_final.json`` fixes
folds) replaces the seeded split, so a study can hold an external test set fixed; the split used is
written to ``<out_dir>/splits.json`` either way.

Per-subject attributes (site, scanner, protocol, …) come from a ``subjects.csv`` beside
``dataset.json`` (a ``subject`` column with the ids below, one column per attribute) and from extra
keys of ``dataset.json``'s ``training`` entries; the sweep's report breaks test Dice down by them.

Preprocessed volumes are cached as ``.npz`` files keyed by a hash of (image and label path, size,
mtime, preprocessing parameters, declared labels), written atomically, so the trials of a sweep
do not redo the work; a volume that fails validation leaves a ``.err`` file with its one-line reason
and is skipped (and reported) by every later run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from downstream.config import DataConfig
from ssl_pretrain.data.ingest import discover, parse_msd_labels, split_ids
from ssl_pretrain.data.preprocess import (
    ImageFiles,
    InputError,
    PreprocessParams,
    Volume,
    first_file,
    load_nifti,
    preprocess,
)
from ssl_pretrain.data.volumes import VolumeSample, preprocess_volume
from ssl_pretrain.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "LabeledSubject",
    "LabeledDataset",
    "Splits",
    "PreparedData",
    "VolumeCache",
    "open_labeled",
    "prepare_configured",
    "make_splits",
    "load_splits",
    "write_splits",
    "read_attributes",
    "subject_attributes",
    "draw_labeled",
    "prepare",
]

_CACHE_VERSION = 1


@dataclass(frozen=True)
class LabeledSubject:
    """One image with its label map."""

    id: str
    image: ImageFiles
    label: Path


@dataclass
class LabeledDataset:
    """The labeled subjects of one dataset folder.

    Args:
        root: The dataset folder.
        name: ``dataset.json`` ``name`` (or the folder name), used in the registry model name.
        subjects: Subjects with an image and a label, sorted by id.
        label_names: ``{value: name}`` of the declared labels, background (0) included.
        declared: Whether ``label_names`` came from ``dataset.json`` (then other values are errors).
        skipped: ``(path, reason)`` of inputs that were left out.
        attributes: ``{subject id: {attribute: value}}`` from ``subjects.csv`` / ``dataset.json``.
    """

    root: Path
    name: str
    subjects: list[LabeledSubject]
    label_names: dict[int, str]
    declared: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output classes of the segmentation head, background included."""
        return max(self.label_names) + 1


@dataclass(frozen=True)
class Splits:
    """Subject ids of the fixed test and validation sets and of the training pool."""

    train_pool: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


@dataclass
class PreparedData:
    """What a finetuning run needs: the dataset, its splits and the (cached) preprocessed volumes."""

    dataset: LabeledDataset
    params: PreprocessParams
    splits: Splits
    cache: VolumeCache
    skipped: list[tuple[str, str]]

    @property
    def spatial_dims(self) -> int:
        """3 when volumes are prepared whole (a Z Y X spacing), 2 for slices."""
        return 3 if self.params.volumetric else 2

    def volumes(self, ids: tuple[str, ...] | list[str]) -> dict[str, Volume | VolumeSample]:
        """Load preprocessed volumes by subject id (from the cache): slices, or whole 3D volumes."""
        by_id = {s.id: s for s in self.dataset.subjects}
        return {i: self.cache.load(by_id[i]) for i in ids}


def open_labeled(root: str | os.PathLike[str], labels: Sequence[str] | None = None) -> LabeledDataset:
    """Find the labeled subjects of a dataset folder and its classes.

    Classes come from a declaration: ``dataset.json``'s ``labels``, or else ``labels`` (the config's
    ``data.labels``: class names by value, background first). Without either they are inferred from
    the label files, read with the safe loader (an unreadable label skips its subject with the
    reason), and must then be the contiguous integers ``0..K-1``: a stray value (a 255 in one file)
    is an error naming the files and values, not ``K = 256`` classes.

    Args:
        root: MSD-layout folder or a folder with image/label folders of matching names.
        labels: Class names by value when ``dataset.json`` declares none.

    Returns:
        The dataset; subjects without a (readable) label are listed in ``skipped``.

    Raises:
        ValueError: ``root`` does not exist, its ``dataset.json`` is malformed, no subject has a
            label, or inferred label values are not contiguous from 0.
    """
    if not str(root):
        raise ValueError("data.root: required - a labeled dataset folder (MSD layout or imagesTr/ + labelsTr/)")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data.root: {root} is not a directory")
    subjects, found_skipped = discover(root, labels=True)
    skipped = [(str(p), str(r)) for p, r in found_skipped]
    labeled = [LabeledSubject(str(s.id), s.image, Path(s.label)) for s in subjects if s.label]
    if not labeled:
        raise ValueError(f"data.root: {root} holds no image with a matching label (imagesTr/ + labelsTr/)")
    name = root.name
    meta_path = root / "dataset.json"
    label_names: dict[int, str] = {}
    declared = False
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON (line {e.lineno})") from None
        if "labels" in meta:
            label_names = parse_msd_labels(meta["labels"], meta_path)
            declared = True
        name = str(meta.get("name") or name)
    if not declared and labels:
        label_names, declared = dict(enumerate(labels)), True
    if not declared:
        labeled, label_names = _infer_classes(root, labeled, skipped)
    labeled.sort(key=lambda s: s.id)
    attributes = read_attributes(root, labeled)
    return LabeledDataset(root, _safe_name(name), labeled, label_names, declared, skipped, attributes)


def _infer_classes(root: Path, labeled: list[LabeledSubject], skipped: list[tuple[str, str]]
                   ) -> tuple[list[LabeledSubject], dict[int, str]]:
    """Classes from the label files' values (safe loader; unreadable labels skip their subject)."""
    values_of: dict[str, set[int]] = {}
    readable = []
    for s in labeled:
        try:
            data = np.asanyarray(load_nifti(s.label, kind="label").dataobj)
        except InputError as e:
            skipped.append((str(first_file(s.image)), str(e)))
            continue
        values_of[str(s.label)] = {int(v) for v in np.unique(data)}
        readable.append(s)
    if not readable:
        raise ValueError(f"data.root: {root} holds no readable label file ({skipped[0][1] if skipped else ''})")
    values = set().union(*values_of.values()) | {0}
    stray = sorted(values - set(range(len(values))))
    if stray:
        files = [f for f, v in values_of.items() if v & set(stray)]
        raise ValueError(
            f"{files[0]}: label values {stray} make the classes {sorted(values)[:8]}… not contiguous from 0"
            f"{f' (also in {len(files) - 1} more file(s))' if len(files) > 1 else ''}; fix the label files or "
            f"declare the classes (dataset.json 'labels', or data.labels=[background, …])"
        )
    return readable, {v: ("background" if v == 0 else f"class{v}") for v in sorted(values)}


_ENTRY_KEYS = {"image", "label"}


def read_attributes(root: str | os.PathLike[str], subjects: list[LabeledSubject]) -> dict[str, dict[str, str]]:
    """Per-subject attributes of a dataset folder (empty when it declares none).

    Two sources, merged (``subjects.csv`` wins where both give the same attribute):

    * ``subjects.csv`` beside ``dataset.json``: a ``subject`` column with the ids of ``subjects``
      (file names without ``.nii[.gz]``) and one column per attribute, e.g. ``subject,site,protocol``;
    * extra keys of ``dataset.json``'s ``training`` entries, e.g.
      ``{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz", "site": "A"}``.

    Args:
        root: Dataset folder.
        subjects: Its labeled subjects (ids and resolved image paths).

    Returns:
        ``{subject id: {attribute: value as text}}``.

    Raises:
        ValueError: ``subjects.csv`` has no ``subject`` column, an id that is not a labeled subject,
            or an id twice (one line naming the file and the id).
    """
    root = Path(root)
    known = {s.id for s in subjects}
    by_image = {first_file(s.image).resolve(): s.id for s in subjects}
    out: dict[str, dict[str, str]] = {}
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            entries = json.loads(meta_path.read_text()).get("training") or []
        except (json.JSONDecodeError, AttributeError):
            entries = []  # open_labeled reports a malformed dataset.json
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("image"), str):
                continue
            img = Path(e["image"])
            sid = by_image.get((img if img.is_absolute() else root / img).resolve())
            extra = {str(k): str(v) for k, v in e.items() if k not in _ENTRY_KEYS and not isinstance(v, (dict, list))}
            if sid is not None and extra:
                out.setdefault(sid, {}).update(extra)
    csv_path = root / "subjects.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheet exports start with a BOM
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "subject" not in fields:
                raise ValueError(
                    f"{csv_path}: no 'subject' column (header {fields}); the first column must be 'subject' "
                    "with the subject ids"
                )
            seen: set[str] = set()
            for rec in reader:
                rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
                sid = rec.pop("subject")
                if sid not in known:
                    raise ValueError(
                        f"{csv_path}: subject {sid!r} is not a labeled subject of {root} "
                        f"(ids are image file names without .nii.gz, e.g. {sorted(known)[0]!r})"
                    )
                if sid in seen:
                    raise ValueError(f"{csv_path}: subject {sid!r} appears twice")
                seen.add(sid)
                out.setdefault(sid, {}).update({k: v for k, v in rec.items() if k})
    return {k: out[k] for k in sorted(out)}


def subject_attributes(root: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """:func:`read_attributes` of a dataset folder, without reading any volume."""
    found, _ = discover(Path(root), labels=True)
    return read_attributes(root, [LabeledSubject(str(s.id), s.image, Path(s.label)) for s in found if s.label])


def _safe_name(name: str) -> str:
    return (
        "".join(c if c.isalnum() or c in "-_" else "-" for c in name.strip().lower()).strip("-") or "dataset"
    )


def make_splits(ids: list[str] | tuple[str, ...], n_val: int, n_test: int, split_seed: int) -> Splits:
    """Split subject ids into fixed test and validation sets and a training pool (by :func:`split_ids`).

    Args:
        ids: Usable subject ids.
        n_val: Validation subjects.
        n_test: Test subjects.
        split_seed: Seed of the permutation (the same seed always gives the same test set).

    Raises:
        ValueError: Fewer than ``n_val + n_test + 1`` subjects.
    """
    if len(ids) < n_val + n_test + 1:
        raise ValueError(
            f"data: {len(ids)} usable labeled volumes, need at least data.n_val + data.n_test + 1 = "
            f"{n_val + n_test + 1}"
        )
    test, val, pool = split_ids(ids, (n_test, n_val), split_seed)
    return Splits(train_pool=pool, val=val, test=test)


_SPLIT_KEYS = ("train_pool", "val", "test")


def load_splits(path: str | os.PathLike[str], usable: list[str] | tuple[str, ...], *, fold: int | None = None,
                n_test: int = 0, split_seed: int = 0) -> Splits:
    """Read a fixed split (``data.splits``) and check it against the usable subjects.

    Args:
        path: JSON file ``{"train_pool": [ids], "val": [ids], "test": [ids]}``, or nnU-Net's
            ``splits_final.json`` (a list of folds ``{"train": [ids], "val": [ids]}``) with ``fold``.
        usable: Subject ids that exist and passed preprocessing.
        fold: The fold of a ``splits_final.json`` (``data.fold``).
        n_test, split_seed: nnU-Net folds only, when every usable subject is in the fold's lists: hold
            ``n_test`` cases of its train list out as the test set (by :func:`split_ids`).

    Raises:
        ValueError: Unreadable file, a missing or empty list, an unknown (or unusable) subject, a
            subject in two lists, or a fold missing or out of range — one line naming the file and the id.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"data.splits: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"data.splits: {path} is not a readable JSON file ({e})") from None
    if isinstance(raw, list):
        raw = _nnunet_fold(path, raw, usable, fold, n_test, split_seed)
    elif fold is not None:
        raise ValueError(f"data.fold: {fold} given but {path} is not an nnU-Net splits_final.json (a list of folds)")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object with lists {list(_SPLIT_KEYS)}")
    known = set(usable)
    where: dict[str, str] = {}
    lists: dict[str, tuple[str, ...]] = {}
    for key in _SPLIT_KEYS:
        ids = raw.get(key)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: {key!r} must be a list of subject ids")
        if not ids:
            raise ValueError(f"{path}: {key!r} is empty; it needs at least one subject")
        for sid in ids:
            if sid not in known:
                raise ValueError(
                    f"{path}: subject {sid!r} in {key!r} is not a usable labeled subject of the dataset"
                )
            if sid in where:
                raise ValueError(f"{path}: subject {sid!r} is in both {where[sid]!r} and {key!r}")
            where[sid] = key
        lists[key] = tuple(sorted(ids))
    return Splits(train_pool=lists["train_pool"], val=lists["val"], test=lists["test"])


def _nnunet_fold(path: Path, folds: list, usable: list[str] | tuple[str, ...], fold: int | None, n_test: int,
                 split_seed: int) -> dict[str, list[str]]:
    """``{"train_pool", "val", "test"}`` of fold ``fold`` of an nnU-Net ``splits_final.json``."""
    if fold is None:
        raise ValueError(f"data.splits: {path} is nnU-Net's list of {len(folds)} folds; set data.fold "
                         f"(0..{len(folds) - 1})")
    if not 0 <= fold < len(folds):
        raise ValueError(f"data.fold: {fold} is out of range; {path} has folds 0..{len(folds) - 1}")
    entry = folds[fold]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("train", "val")):
        raise ValueError(f"{path}: fold {fold} must be an object with 'train' and 'val' lists of case ids")
    train, val = [str(i) for i in entry["train"]], [str(i) for i in entry["val"]]
    test = sorted(set(usable) - set(train) - set(val))
    if not test:  # every case is in the fold: hold some of its training cases out for testing
        if len(train) <= n_test:
            raise ValueError(f"{path}: fold {fold} has {len(train)} training cases, too few to hold data.n_test = "
                             f"{n_test} out as the test set (or add labelsTs/)")
        test, _ = split_ids(train, (n_test,), split_seed)
        train = sorted(set(train) - set(test))
        log.info("data.fold %d: every case is in the fold; %d of its training cases held out as the test set "
                 "(data.n_test, data.split_seed)", fold, n_test)
    return {"train_pool": train, "val": val, "test": list(test)}


def write_splits(splits: Splits, path: str | os.PathLike[str]) -> Path:
    """Write a split as ``data.splits`` reads it (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({k: list(getattr(splits, k)) for k in _SPLIT_KEYS}, indent=1))
    return path


def draw_labeled(pool: tuple[str, ...], n_labeled: int, seed: int) -> tuple[str, ...]:
    """Draw ``n_labeled`` training volumes from the pool by ``seed`` (0 = the whole pool), by :func:`split_ids`.

    Raises:
        ValueError: ``n_labeled`` is larger than the pool.
    """
    if n_labeled == 0:
        return tuple(pool)
    if n_labeled > len(pool):
        raise ValueError(f"n_labeled: {n_labeled} is larger than the training pool of {len(pool)} volumes")
    return split_ids(pool, (n_labeled,), seed)[0]


class VolumeCache:
    """On-disk cache of preprocessed labeled volumes.

    Args:
        directory: Where the ``.npz`` (and ``.err``) files live.
        params: Preprocessing parameters.
        allowed_labels: Declared label values, or ``None`` to accept any.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        params: PreprocessParams,
        allowed_labels: tuple[int, ...] | None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.params = params
        self.allowed_labels = allowed_labels

    def key(self, subject: LabeledSubject) -> str:
        """Hash of the input files' identity and the preprocessing."""
        parts: dict[str, Any] = {
            "v": _CACHE_VERSION,
            "params": self.params.to_dict(),
            "labels": list(self.allowed_labels or []),
        }
        image = subject.image if isinstance(subject.image, tuple) else (subject.image,)
        for name, files in (("image", image), ("label", (subject.label,))):
            ids = [[str(p.resolve()), st.st_size, st.st_mtime_ns] for p in files for st in (p.stat(),)]
            parts[name] = ids[0] if len(ids) == 1 else ids  # one file: the key of earlier releases
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def ensure(self, subject: LabeledSubject) -> str | None:
        """Preprocess ``subject`` into the cache unless it is there; return the reason it is unusable."""
        key = self.key(subject)
        npz, err = self.directory / f"{key}.npz", self.directory / f"{key}.err"
        if npz.is_file():
            return None
        if err.is_file():
            return err.read_text().strip()
        try:
            prep = preprocess_volume if self.params.volumetric else preprocess
            vol = prep(subject.image, self.params, subject.label, allowed_labels=self.allowed_labels)
        except (InputError, ValueError) as e:
            reason = str(e).splitlines()[0]
            atomic_write_text(err, reason)
            return reason
        payload = {
            "image": vol.image.astype(np.float32),
            "label": vol.label.astype(np.uint8),
            "spacing": np.asarray(vol.spacing, dtype=np.float64),
            "geometry": np.asarray(json.dumps(vol.geometry)),
        }
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, **payload)
        return None

    def load(self, subject: LabeledSubject) -> Volume | VolumeSample:
        """Return the cached preprocessed volume (preprocessing it first when missing): slices
        (:class:`Volume`) or, for a Z Y X spacing, one cropped volume (:class:`VolumeSample`).

        Raises:
            InputError: The volume is unusable (the reason names the file).
        """
        reason = self.ensure(subject)
        if reason is not None:
            raise InputError(reason)
        with np.load(self.directory / f"{self.key(subject)}.npz", allow_pickle=False) as z:
            kind = VolumeSample if self.params.volumetric else Volume
            return kind(
                image=z["image"],
                label=z["label"],
                spacing=tuple(float(s) for s in z["spacing"]),  # type: ignore[arg-type]
                geometry=json.loads(str(z["geometry"])),
            )


def prepare(
    root: str | os.PathLike[str],
    params: PreprocessParams,
    *,
    n_val: int,
    n_test: int,
    split_seed: int,
    cache_dir: str | os.PathLike[str],
    splits_file: str | os.PathLike[str] | None = None,
    fold: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
) -> PreparedData:
    """Open a labeled dataset, preprocess every volume into the cache and split the usable ones.

    Unusable volumes (image/label shape or affine mismatch, undeclared label values, unreadable
    files) are skipped with a one-line warning each.

    Args:
        root: Dataset folder.
        params: Preprocessing (an init export's own parameters, or the config's).
        n_val: Validation subjects.
        n_test: Test subjects.
        split_seed: Seed of the split.
        cache_dir: Cache folder of preprocessed volumes (never inside ``root``: data folders may be
            read-only or shared).
        splits_file: A fixed split (``data.splits``) used instead of the seeded one (``n_val``,
            ``n_test`` and ``split_seed`` are then ignored), or nnU-Net's ``splits_final.json``.
        fold: The fold of a ``splits_final.json`` (``data.fold``; see :func:`load_splits`).
        out_dir: Where the split used is written as ``splits.json`` (not written when ``None``).
        labels: Class names by value when the dataset declares none (``data.labels``).

    Returns:
        The prepared data.

    Raises:
        ValueError: No usable dataset, too few usable volumes for the splits, or a bad splits file.
    """
    ds = open_labeled(root, labels)
    allowed = tuple(ds.label_names)
    cache = VolumeCache(cache_dir, params, allowed)
    skipped = list(ds.skipped)
    good: list[str] = []
    for s in ds.subjects:
        reason = cache.ensure(s)
        if reason is None:
            good.append(s.id)
        else:
            skipped.append((str(first_file(s.image)), reason))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if splits_file:
        splits = load_splits(splits_file, good, fold=fold, n_test=n_test, split_seed=split_seed)
        log.info("fixed split from %s: %d train pool, %d val, %d test", splits_file, len(splits.train_pool),
                 len(splits.val), len(splits.test))
    else:
        splits = make_splits(good, n_val, n_test, split_seed)
    if out_dir is not None:
        write_splits(splits, Path(out_dir) / "splits.json")
    return PreparedData(ds, params, splits, cache, skipped)


def prepare_configured(data: DataConfig, params: PreprocessParams, *, cache_dir: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str] | None) -> PreparedData:
    """:func:`prepare` with the ``data`` section of a finetuning or sweep config."""
    return prepare(data.root, params, n_val=data.n_val, n_test=data.n_test, split_seed=data.split_seed,
                   cache_dir=cache_dir, splits_file=data.splits, fold=data.fold, out_dir=out_dir,
                   labels=data.labels)
