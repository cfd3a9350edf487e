"""Discover input volumes: a folder of NIfTI files, an MSD ``dataset.json``, or a list file.

* **Folder**: every ``.nii`` / ``.nii.gz`` below it (recursively). When the folder has
  ``imagesTr/`` and ``labelsTr/`` sub-folders, label files are paired with images by file name;
  a file named ``*_seg.nii.gz`` / ``*_label.nii.gz`` / ``*_mask.nii.gz`` next to an image is its label.
* **MSD**: ``dataset.json`` (or the folder holding it); ``training`` entries give image and label,
  ``test`` entries images only, ``labels`` declares the allowed label values.
* **nnU-Net v2 raw dataset**: a ``DatasetXXX_Name/`` folder whose ``dataset.json`` has ``channel_names``
  and ``file_ending``: cases ``imagesTr/{case}_{channel:04d}{file_ending}`` (one file per channel, grouped
  per case in ``channel_names`` order) with ``labelsTr/{case}{file_ending}``, and ``imagesTs/`` (labeled
  when a ``labelsTs/`` has the case). Its ``imagesTr/`` or ``imagesTs/`` folder alone reads as that part.
* **List file** (``.txt``): one image path per line, optionally ``image<TAB>label``; spaces,
  ``#`` and non-ASCII characters are part of a name; relative paths are relative to the list
  file; a line starting with ``#`` is a comment.

Discovery never raises for one bad entry: missing files are returned as ``skipped`` with a reason.
:func:`split_ids` is the one subject-level split of the project (shard validation split, finetuning
test/validation/pool split, and the draw of labeled training volumes).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ssl_pretrain.data.preprocess import ImageFiles, first_file

logger = logging.getLogger(__name__)

_LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Subject:
    """One input volume.

    Args:
        id: unique subject id (file name without ``.nii[.gz]``; made unique when names repeat).
        image: image file, or one file per channel (nnU-Net datasets).
        label: label file or ``None``.
        source: image path relative to the input root (recorded in ``meta.json`` and the manifest).
        allowed_labels: label values the dataset declares (MSD ``labels``), ``None`` = any uint8.
    """

    id: str
    image: ImageFiles
    label: Path | None
    source: str = ""
    allowed_labels: tuple[int, ...] | None = None


def is_nifti_name(path: str | Path) -> bool:
    """Whether a file name ends in ``.nii`` or ``.nii.gz`` (the name only; the file need not exist)."""
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without ``.nii`` / ``.nii.gz`` (``case_01.nii.gz`` → ``case_01``); else ``Path.stem``."""
    path = Path(path)
    for ext in NIFTI_SUFFIXES:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def parse_msd_labels(labels: Any, path: str | Path) -> dict[int, str]:
    """Read an MSD ``dataset.json`` ``labels`` declaration into ``{value: name}``, background included.

    Accepts ``{"0": "background", "1": "liver"}`` (the MSD form) and ``{"background": 0, ...}``.

    Args:
        labels: the ``labels`` value of the file.
        path: the ``dataset.json`` (named in errors).

    Returns:
        ``{value: name}`` sorted by value, with ``0: "background"`` added when not declared.

    Raises:
        InputError: not a non-empty mapping, an entry of neither form, or a value outside 0..255.
    """
    from ssl_pretrain.data.preprocess import InputError

    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{path}: 'labels' must be a non-empty mapping of label value to name")
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            out[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out[v] = str(k)
        else:
            raise InputError(f"{path}: label entry {k!r}: {v!r} is neither 'value: name' nor 'name: value'")
    if any(v < 0 or v > 255 for v in out):
        raise InputError(f"{path}: label values must be in 0..255, got {sorted(out)}")
    out.setdefault(0, "background")
    return dict(sorted(out.items()))


def split_ids(ids: Iterable[str], sizes: Sequence[int], seed: int) -> tuple[tuple[str, ...], ...]:
    """Subject-level split: cut a seeded permutation of the sorted ids into parts of the given sizes.

    The ids are sorted first, so the split depends only on the set of ids and the seed, never on
    the order of discovery; the permutation is ``numpy.random.default_rng(seed).permutation``.

    Args:
        ids: Unique subject ids.
        sizes: Sizes of the leading parts, e.g. ``(n_test, n_val)``.
        seed: Seed of the permutation (the same ids and seed always give the same parts).

    Returns:
        ``len(sizes) + 1`` tuples of ids, each sorted: the first ``sizes[0]`` ids of the permutation,
        the next ``sizes[1]``, …, and last the rest.

    Raises:
        ValueError: An id appears twice, a size is negative, or the sizes add up to more than the ids.

    Example:
        >>> test, val, pool = split_ids([f"s{i}" for i in range(10)], (2, 1), seed=0)
        >>> len(test), len(val), len(pool)
        (2, 1, 7)
    """
    ordered = sorted(ids)
    twice = sorted({a for a, b in pairwise(ordered) if a == b})
    if twice:
        raise ValueError(f"subject ids must be unique; {twice[:5]} appear more than once")
    if any(n < 0 for n in sizes) or sum(sizes) > len(ordered):
        raise ValueError(f"split sizes {list(sizes)} must be ≥ 0 and add up to at most the {len(ordered)} subjects")
    perm = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    bounds = np.cumsum([0, *sizes, len(ordered) - sum(sizes)]).tolist()
    return tuple(tuple(sorted(perm[a:b])) for a, b in pairwise(bounds))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _unique_ids(subjects: list[Subject]) -> list[Subject]:
    """Make ids unique and safe for WebDataset keys (no dots, no slashes)."""
    seen: dict[str, int] = {}
    for s in subjects:
        base = _safe_id(s.id)  # letters of any script stay readable
        sid = base
        while sid in seen:
            seen[base] += 1
            sid = f"{base}_{seen[base]}"
        seen.setdefault(sid, 0)
        s.id = sid
    return subjects


def discover(path: str | Path, *, labels: bool | None = None) -> tuple[list[Subject], list[tuple[str, str]]]:
    """Find the subjects under ``path``.

    Args:
        path: folder, MSD ``dataset.json`` (or its folder), or ``.txt`` list file.
        labels: ``True`` requires a label for every subject (others are skipped), ``False`` ignores
            labels, ``None`` uses labels where they exist.

    Returns:
        (subjects sorted by id, skipped inputs as ``(path, reason)``).

    Raises:
        InputError: ``path`` does not exist, is an unreadable ``dataset.json`` / list file, or
            holds no NIfTI files at all.
    """
    from ssl_pretrain.data.preprocess import InputError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input not found (expected a folder, dataset.json or .txt list)")
    skipped: list[tuple[str, str]] = []
    part = None
    if path.is_dir() and path.name in _NNUNET_PARTS and is_nnunet_folder(path):
        path, part = path.parent / "dataset.json", path.name
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.is_file() and path.name.endswith(".json") and _is_nnunet(path):
        subjects = _from_nnunet(path, skipped, part)
    elif path.is_file() and path.name.endswith(".json"):
        subjects = _from_msd(path, skipped)
    elif path.is_file():
        subjects = _from_list(path, skipped)
    else:
        subjects = _from_folder(path)
    out: list[Subject] = []
    for s in subjects:
        if labels is False:
            s.label = None
        elif labels is True and s.label is None:
            skipped.append((str(first_file(s.image)), "no label file found"))
            continue
        out.append(s)
    if not out and not skipped:
        raise InputError(f"{path}: no .nii/.nii.gz volumes found")
    out = _unique_ids(sorted(out, key=lambda s: (s.id, str(first_file(s.image)))))
    for p, reason in skipped:
        logger.warning("skipped %s: %s", p, reason)
    return out, skipped


def _from_folder(root: Path) -> list[Subject]:
    files = sorted(p for p in root.rglob("*") if is_nifti_name(p) and p.is_file())
    label_dirs = {"labelsTr", "labelsTs", "labels", "masks", "segmentations"}
    labels_by_name: dict[str, Path] = {}
    images: list[Path] = []
    for f in files:
        if f.parent.name in label_dirs or any(nifti_stem(f).endswith(sfx) for sfx in _LABEL_SUFFIXES):
            labels_by_name[f.name] = f
        elif f.name.startswith("._"):  # macOS resource forks
            continue
        else:
            images.append(f)
    subjects = []
    for img in images:
        label = None
        for sfx in ("",) + _LABEL_SUFFIXES:
            stem = nifti_stem(img) + sfx
            for ext in (".nii.gz", ".nii"):
                cand = labels_by_name.get(stem + ext)
                if cand is not None and (sfx or cand.parent != img.parent):
                    label = cand
                    break
            if label is not None:
                break
        subjects.append(Subject(nifti_stem(img), img, label, _rel(img, root)))
    return subjects


def _from_msd(path: Path, skipped: list[tuple[str, str]]) -> list[Subject]:
    from ssl_pretrain.data.preprocess import InputError

    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable dataset.json ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training", []), list):
        raise InputError(f"{path}: expected an MSD dataset.json with a 'training' list")
    root = path.parent
    allowed = tuple(parse_msd_labels(meta["labels"], path)) if meta.get("labels") is not None else None
    entries: list[tuple[str | None, str | None]] = []
    for e in meta.get("training", []):
        if isinstance(e, dict):
            entries.append((e.get("image"), e.get("label")))
        else:
            entries.append((e if isinstance(e, str) else None, None))
    for e in meta.get("test", []) or []:
        entries.append((e.get("image") if isinstance(e, dict) else e, None))
    subjects = []
    for image, label in entries:
        if not isinstance(image, str):
            skipped.append((str(path), f"entry without an image path: {image!r}"))
            continue
        img = (root / image).resolve() if not Path(image).is_absolute() else Path(image)
        if not img.is_file():
            skipped.append((str(img), f"listed in {path.name} but missing"))
            continue
        lab = None
        if isinstance(label, str):
            lab = (root / label).resolve() if not Path(label).is_absolute() else Path(label)
            if not lab.is_file():
                skipped.append((str(lab), f"label listed in {path.name} but missing"))
                continue
        subjects.append(Subject(nifti_stem(img), img, lab, _rel(img, root), allowed))
    return subjects


_NNUNET_PARTS = ("imagesTr", "imagesTs")


def _is_nnunet(path: Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 ``dataset.json`` (it has ``channel_names`` and ``file_ending``)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and "channel_names" in meta and "file_ending" in meta


def is_nnunet_folder(path: Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 raw dataset folder, or its ``imagesTr/`` / ``imagesTs/``."""
    path = Path(path)
    in_part = path.name in _NNUNET_PARTS and _is_nnunet(path.parent / "dataset.json")
    return in_part or _is_nnunet(path / "dataset.json")


def read_nnunet_json(path: Path) -> tuple[list[str], str, dict[int, str]]:
    """``(channel names in channel order, file ending, {label value: name})`` of an nnU-Net v2 ``dataset.json``.

    Raises:
        InputError: channels not numbered ``0..C-1``, a file ending nibabel does not read as NIfTI, or
            region-based labels (a label given as a list of values), which mri-ssl does not train.
    """
    from ssl_pretrain.data.preprocess import InputError

    meta = json.loads(path.read_text())
    names = meta["channel_names"]
    if not isinstance(names, dict) or not names or set(map(str, names)) != {str(i) for i in range(len(names))}:
        raise InputError(f"{path}: 'channel_names' must map '0', '1', … to channel names, got {names!r}")
    ending = meta["file_ending"]
    if ending not in NIFTI_SUFFIXES:
        raise InputError(f"{path}: file_ending {ending!r} is not supported; mri-ssl reads NIfTI (.nii.gz or .nii)")
    labels = meta.get("labels")
    regions = {k: v for k, v in (labels or {}).items() if isinstance(v, (list, tuple))}
    if regions or "regions_class_order" in meta:
        raise InputError(f"{path}: region-based labels ({sorted(regions) or 'regions_class_order'}) are not "
                         "supported; give each label one integer value")
    declared = parse_msd_labels(labels, path) if labels is not None else {}
    return [str(names[str(i)]) for i in range(len(names))], ending, declared


def _from_nnunet(path: Path, skipped: list[tuple[str, str]], part: str | None) -> list[Subject]:
    """Cases of an nnU-Net v2 raw dataset: per-channel files grouped per case, labels by case name."""
    channels, ending, declared = read_nnunet_json(path)
    root = path.parent
    allowed = tuple(declared) if declared else None
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    subjects = []
    for images in (part,) if part else _NNUNET_PARTS:
        folder, labels = root / images, root / images.replace("images", "labels")
        cases: dict[str, dict[int, Path]] = {}
        for f in sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []:
            m = pattern.match(f.name)
            if m is None:
                skipped.append((str(f), f"not named {{case}}_{{channel:04d}}{ending} as {path.name} requires"))
                continue
            cases.setdefault(m["case"], {})[int(m["ch"])] = f
        for case, files in cases.items():
            missing = [c for c in range(len(channels)) if c not in files]
            extra = sorted(set(files) - set(range(len(channels))))
            if missing or extra:
                skipped.append((str(folder / case), f"channel files {sorted(files)} but {path.name} declares "
                                f"{len(channels)} channel(s) {channels}"))
                continue
            label = labels / f"{case}{ending}"
            image = tuple(files[c] for c in range(len(channels)))
            subjects.append(Subject(case, image[0] if len(image) == 1 else image,
                                    label if label.is_file() else None, _rel(image[0], root), allowed))
    return subjects


def _from_list(path: Path, skipped: list[tuple[str, str]]) -> list[Subject]:
    from ssl_pretrain.data.preprocess import InputError

    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable list file ({exc})") from None
    root = path.parent
    subjects = []
    for n, line in enumerate(lines, 1):
        # one path per line (spaces, '#' and any Unicode belong to the name), or image<TAB>label;
        # a comment is a line that starts with '#'
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) > 2 or not all(parts):
            skipped.append((f"{path}:{n}", "expected 'image' or 'image<TAB>label' on the line"))
            continue
        files = [Path(p) if Path(p).is_absolute() else root / p for p in parts]
        missing = [f for f in files if not f.is_file()]
        if missing:
            skipped.append((str(missing[0]), f"listed in {path.name}:{n} but missing"))
            continue
        subjects.append(Subject(nifti_stem(files[0]), files[0], files[1] if len(files) == 2 else None,
                                _rel(files[0], root)))
    return subjects


def read_exclusions(path: str | Path) -> set[str]:
    """Subject ids to keep out of a pretraining set: evaluation subjects must never be pretrained on.

    Args:
        path: A split file (JSON: its ``val`` and ``test`` lists — every subject that evaluates a
            model — are excluded; ``train_pool`` is not) or a text list (one subject id or NIfTI path
            per line; ``#`` at line start is a comment). Paths are reduced to the id discovery gives
            them (the file name without ``.nii[.gz]``, with the same character rules).

    Raises:
        InputError: Missing or unreadable file, or a JSON file without ``val`` / ``test`` lists.
    """
    from ssl_pretrain.data.preprocess import InputError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--exclude: {path} is not a readable file ({exc})") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--exclude: {path} is not valid JSON (line {exc.lineno})") from None
        lists = [raw.get(k) for k in ("val", "test")] if isinstance(raw, dict) else [None]
        if not all(isinstance(v, list) for v in lists):
            raise InputError(f"--exclude: {path} must hold 'val' and 'test' lists of subject ids (a data.splits file)")
        names = [str(i) for v in lists for i in v]
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return {_safe_id(nifti_stem(n) if is_nifti_name(n) else n) for n in names}


def _safe_id(name: str) -> str:
    """The id discovery gives a name: letters of any script, digits, ``_`` and ``-`` kept, the rest ``_``."""
    return re.sub(r"[^\w\-]", "_", name) or "subject"
