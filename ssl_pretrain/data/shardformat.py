"""The shard format, in one place: names, the ``meta.json`` schema, the tar writer and reader, the manifest.

A shard directory holds ``shard-NNNNNN.tar`` files and ``manifest.json`` (format :data:`FORMAT`,
version :data:`VERSION`). One sample is one 2D axial slice stored as the members
``<key>.image.npy``, ``<key>.label.npy`` (when labelled) and ``<key>.meta.json``; keys are
``<subject>_<slice:04d>`` and contain no dots. The tars are plain POSIX tars (mtime 0, members in
write order) that ``tar`` and stock ``webdataset`` read; nothing is pickled.

Members of one sample:

=============  =========================  ====================================================
member         dtype / type               meaning
=============  =========================  ====================================================
image.npy      float16 ``(C, H, W)``      preprocessed image. Preprocessing works in float32;
                                          it is stored as float16 on disk (half the bytes) and
                                          the loader delivers float32 ``(B, C, H, W)`` batches.
label.npy      uint8 ``(H, W)``           label map (only when the subject has a label)
meta.json      object, fields below       where the slice comes from
=============  =========================  ====================================================

``meta.json`` fields (:data:`META_FIELDS`; :func:`check_meta` checks those the loader delivers):

==============  =====================  ===========================================================
field           type                   meaning
==============  =====================  ===========================================================
subject         str                    subject id (unique within the shard directory)
slice           int ≥ 0                axial slice index in the preprocessed volume (inferior → superior)
num_slices      int ≥ 1                slices of the preprocessed volume
position        float in [0, 1]        relative position ``slice / (num_slices - 1)`` (0.5 for one slice)
spacing         [float, float, float]  (x, y, z) mm of the output grid (x along W, y along H)
source          str                    image path relative to the input root
preprocess      object                 ``PreprocessParams.to_dict()`` the slice was made with
==============  =====================  ===========================================================

``manifest.json`` records ``format``, ``version``, ``split``, ``preprocess``, ``sample`` (the member
dtypes/shapes and the meta fields), ``channels``, ``size``, ``has_labels``, ``label_names``,
``num_samples``, ``num_subjects``, ``shards`` (each ``name``, ``samples``, ``bytes``, ``sha256``),
``subjects`` and ``skipped``. A split output (``val_fraction > 0``) has a top-level manifest whose
``splits`` name the sub-directories (``train``, ``val``), each a shard directory as above.

Readers trust nothing in a shard or a manifest: shard names must be plain file names inside the
shard directory, and every failure while reading a shard is a :class:`CorruptShardError` that
names the shard and the member.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import mmap
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = "mri-ssl-shards"
VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST = "manifest.json"
IMAGE, LABEL, META = "image.npy", "label.npy", "meta.json"
IMAGE_DTYPE, LABEL_DTYPE = "float16", "uint8"
META_FIELDS = ("subject", "slice", "num_slices", "position", "spacing", "source", "preprocess")
# a volume sample (manifest "layout": "volume"): shape (D, H, W), spacing (D, H, W) mm, crop_box on the native grid
VOLUME_META_FIELDS = ("subject", "shape", "spacing", "crop_box", "source", "preprocess")
MAX_MEMBER_BYTES = 1 << 30  # no member of a slice sample comes near this; a larger size is a corrupt header

__all__ = [
    "FORMAT", "IMAGE", "LABEL", "MANIFEST", "META", "META_FIELDS", "SHARD_PATTERN", "VERSION", "VOLUME_META_FIELDS",
    "CorruptShardError", "NpySpec", "TarShardWriter", "check_meta", "is_local", "iter_tar_members",
    "manifest_preprocess", "manifest_subjects", "meta_fields", "npy_bytes", "open_shard", "open_verified",
    "plain_name", "read_manifest", "read_manifest_file", "split_name",
]


class CorruptShardError(ValueError):
    """A shard is truncated or holds a corrupt member; the message names the shard (and member)."""


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def npy_bytes(arr: np.ndarray) -> bytes:
    """``.npy`` bytes of ``arr`` (C order, no pickles)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class TarShardWriter:
    """Rolls samples into ``shard-NNNNNN.tar`` files of at most ``samples_per_shard`` samples.

    Each shard is written as ``*.tmp`` and renamed when full; :attr:`shards` holds the manifest
    entries (``name``, ``samples``, ``bytes``, ``sha256``) of the finished ones.

    Args:
        out_dir: directory the shards go to.
        samples_per_shard: samples per tar.
    """

    def __init__(self, out_dir: Path, samples_per_shard: int) -> None:
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp = self.out_dir / (name + ".tmp")
        # stays open across write() calls until the shard is full; closed in _close()
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._count = 0
        self.shards.append({"name": name, "samples": 0, "bytes": 0, "sha256": ""})

    def _close(self) -> None:
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        final = self.out_dir / self.shards[-1]["name"]
        h = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        os.replace(self._tmp, final)
        self.shards[-1].update(samples=self._count, bytes=final.stat().st_size, sha256=h.hexdigest())
        self._tar = None

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> str:
        """Add one sample (``key.<ext>`` members); returns the shard name it went to."""
        if self._tar is None or self._count >= self.samples_per_shard:
            self._close()
            self._open()
        assert self._tar is not None  # for the type checker: _open() set it
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        return self.shards[-1]["name"]

    def finish(self) -> list[dict[str, Any]]:
        """Close the last shard; returns the manifest entries of all shards."""
        self._close()
        return self.shards


# ----------------------------------------------------------------------------------------------
# tar reading
# ----------------------------------------------------------------------------------------------

_BLOCK = 512
_ZERO_BLOCK = b"\x00" * _BLOCK


def _octal(field_: bytes) -> int:
    if field_[:1] in (b"\x80", b"\xff"):  # GNU base-256 encoding of large numbers
        return int.from_bytes(field_[1:], "big")
    return int(field_.rstrip(b"\x00 ").strip() or b"0", 8)


def _read_exact(stream: Any, n: int, url: str, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CorruptShardError(f"{url}: truncated shard (reading {what}: got {len(data)} of {n} bytes)")
    return data


def _name(raw: bytes, url: str, where: str) -> str:
    """A member name as text; names are UTF-8 (tar writers and PAX say so), anything else is corrupt."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptShardError(f"{url}: corrupt {where}: member name {raw[:60]!r} is not UTF-8") from None


def _pax_path(data: bytes, url: str, member: str) -> str | None:
    """The ``path`` record of a PAX extended header (``"<length> <key>=<value>\\n"`` records), if any.

    Raises:
        CorruptShardError: a record whose length is not a positive number that ends inside the
            header on a newline (a length of 0 would otherwise never advance), naming ``url``.
    """
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp > pos else b""
        length = int(digits) if digits.isdigit() else 0
        if length <= sp - pos or pos + length > len(data) or data[pos + length - 1 : pos + length] != b"\n":
            raise CorruptShardError(f"{url}: corrupt PAX header before {member} (malformed record at byte {pos})")
        key, eq, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise CorruptShardError(f"{url}: corrupt PAX header before {member} (record without '=' at byte {pos})")
        if key == b"path":
            return _name(value, url, f"PAX header before {member}")
        pos += length
    return None


def _parse_header(hdr: bytes, url: str, after: str) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte ustar header; ``after`` names the previous member."""
    if hdr[257:262] != b"ustar":
        raise CorruptShardError(f"{url}: corrupt tar header after {after}")
    try:
        size = _octal(hdr[124:136])
    except ValueError:
        raise CorruptShardError(f"{url}: corrupt tar header after {after} (size field)") from None
    name = hdr[:100].split(b"\x00", 1)[0]
    prefix = hdr[345:500].split(b"\x00", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    if not 0 <= size <= MAX_MEMBER_BYTES:
        raise CorruptShardError(f"{url}: corrupt tar header after {after} (member size {size} bytes)")
    return _name(name, url, f"tar header after {after}"), size, hdr[156:157]


def iter_tar_members(stream: Any, url: str) -> Iterator[tuple[str, bytes | memoryview]]:
    """Yield ``(name, data)`` of the regular files of a tar (ustar/PAX/GNU long names).

    Args:
        stream: a readable binary stream, or a bytes-like object holding the whole tar (then the
            data are zero-copy ``memoryview`` slices of it).
        url: shard name used in error messages.

    Raises:
        CorruptShardError: truncated tar, invalid header, malformed PAX record or a name that is
            not UTF-8, naming ``url`` and the member.
    """
    buf = memoryview(stream) if isinstance(stream, (bytes, bytearray, memoryview, mmap.mmap)) else None
    pos = 0

    def take(n: int, what: str) -> bytes | memoryview:
        nonlocal pos
        if buf is None:
            return _read_exact(stream, n, url, what)
        if pos + n > len(buf):
            raise CorruptShardError(f"{url}: truncated shard (reading {what}: got {len(buf) - pos} of {n} bytes)")
        pos += n
        return buf[pos - n : pos]

    long_name: str | None = None
    last = "the start"  # the member before the next header, for error messages
    while True:
        if buf is None:
            hdr = stream.read(_BLOCK)
        else:
            hdr = bytes(buf[pos : pos + _BLOCK])
            pos += len(hdr)
        if hdr == _ZERO_BLOCK:
            return  # end-of-archive marker
        if not hdr:  # every tar writer ends with zero blocks: a bare end means a cut-off file
            raise CorruptShardError(f"{url}: truncated shard (no end-of-archive marker after {last})")
        if len(hdr) != _BLOCK:
            raise CorruptShardError(f"{url}: truncated shard (partial tar header after {last})")
        name, size, kind = _parse_header(hdr, url, last)
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"0", b"\x00"):
            if long_name is not None:
                name, long_name = long_name, None
            data = take(size, name)
            if padded > size:
                take(padded - size, name + " padding")
            last = name
            yield name, data
        elif kind in (b"x", b"L"):
            ext = bytes(take(padded, f"extended header after {last}")[:size])
            if kind == b"x":
                long_name = _pax_path(ext, url, f"the member after {last}")
            else:
                long_name = _name(ext.rstrip(b"\x00"), url, f"GNU long name after {last}")
        elif padded:  # directories, links, global headers: skip their payload
            take(padded, f"member after {last}")


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (not a ``pipe:`` command or a ``scheme://`` URL)."""
    return "://" not in url and not url.startswith("pipe:")


def open_shard(url: str, populate: bool = True) -> Any:
    """A local shard is memory-mapped (zero-copy member slices); other URLs are streamed by wds.gopen.

    ``populate``: map every (cached) page up front (``MAP_POPULATE``) instead of faulting 4 KiB at a
    time — right when every byte is read (slices); patches of volumes touch only part of them, and
    faulting in just those pages is faster (about 2x per 64³ patch of a 14 MB volume).
    """
    if is_local(url):
        with open(url, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    import webdataset as wds

    return wds.gopen(url, "rb")


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def open_verified(url: str, entry: dict[str, Any] | None, verify: Literal["none", "size", "sha256"],
                  verified: set[tuple[Any, ...]], populate: bool = True) -> Any:
    """:func:`open_shard`, then check the shard against its manifest entry.

    Args:
        url: the shard.
        entry: its manifest entry (``bytes``, ``sha256``); ``None`` reads it unchecked.
        verify: ``"none"``, ``"size"`` (cheap) or ``"sha256"`` (size and digest).
        verified: identities (url, device, inode, size, mtime) of local shards already hashed by
            the caller; the digest of an unchanged local file is computed once (a resampled stream
            reopens the same shards every round). Updated in place.
        populate: passed to :func:`open_shard`.

    Returns:
        A memory map or bytes of the whole shard (a streamed shard is read whole to be checked;
        shards are tens of MB), or the open stream when nothing is checked.

    Raises:
        CorruptShardError: cannot be opened, or size / sha256 differ from the manifest.
    """
    try:
        ident = (url, *_identity(url)) if is_local(url) and verify == "sha256" else None
        stream = open_shard(url, populate)
        if verify == "none" or entry is None:
            return stream
        if not isinstance(stream, (bytes, mmap.mmap)):
            with stream:
                stream = stream.read()
    except OSError as exc:
        raise CorruptShardError(f"{url}: cannot open shard ({exc})") from None
    if len(stream) != entry["bytes"]:
        raise CorruptShardError(f"{url}: {len(stream)} bytes, but the manifest records {entry['bytes']} "
                                f"(data.verify={verify}; re-copy the shard)")
    if verify == "sha256" and (ident is None or ident not in verified):
        digest = hashlib.sha256(stream).hexdigest()
        if digest != entry["sha256"]:
            raise CorruptShardError(f"{url}: sha256 {digest[:16]}… differs from the manifest's "
                                    f"{entry['sha256'][:16]}… (data.verify=sha256; re-copy the shard)")
        if ident is not None:
            verified.add(ident)
    return stream


class NpySpec:
    """Expected ``.npy`` layout: header bytes computed once, then checked by prefix comparison.

    ``None`` in ``shape`` (volumes: their sizes differ) means any size on that axis; such a spec
    parses every header (:meth:`payload_shape`).
    """

    def __init__(self, shape: tuple[int | None, ...], dtype: str) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        if None in self.shape:
            self.header, self.nbytes = b"", -1
            return
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        )
        self.header = buf.getvalue()
        self.nbytes = len(self.header) + int(np.prod(self.shape)) * self.dtype.itemsize

    def payload_shape(self, data: bytes | memoryview, url: str, name: str) -> tuple[tuple[int, ...], memoryview]:
        """``(shape, array bytes)``; the shape is read from the header when the spec leaves sizes open.

        Raises:
            CorruptShardError: not a C-order ``.npy`` of the expected dtype, rank and fixed sizes.
        """
        if self.nbytes >= 0:
            return self.shape, self.payload(data, url, name)  # type: ignore[return-value]
        try:
            f = io.BytesIO(bytes(data[: 1 << 16]))
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            shape = tuple(int(n) for n in shape)
            ok = not fortran and np.dtype(dtype) == self.dtype and len(shape) == len(self.shape)
            ok = ok and all(e is None or e == n for e, n in zip(self.shape, shape, strict=False))
            ok = ok and len(data) - f.tell() == math.prod(shape) * self.dtype.itemsize
        except Exception:  # numpy raises several types for a damaged header; all mean "not this array"
            ok = False
        if not ok:
            want = tuple("*" if n is None else n for n in self.shape)
            raise CorruptShardError(f"{url}: corrupt {name}: expected a {self.dtype} .npy of shape {want}, "
                                    f"got {len(data)} bytes starting {bytes(data[:10])!r}")
        return shape, memoryview(data)[f.tell():]

    def payload(self, data: bytes | memoryview, url: str, name: str) -> memoryview:
        """The array bytes after the ``.npy`` header (zero-copy view), after checking dtype and shape.

        Fast path: the header equals the expected bytes. Otherwise (e.g. another numpy version
        padded it differently) the header is parsed; a different dtype/shape/order is corrupt.

        Raises:
            CorruptShardError: not a ``.npy`` of the expected dtype and shape, naming ``url``.
        """
        n = len(self.header)
        if len(data) == self.nbytes and data[:n] == self.header:
            return memoryview(data)[n:]
        try:
            f = io.BytesIO(bytes(data[: 1 << 16]))
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            ok = (tuple(shape), bool(fortran), np.dtype(dtype)) == (self.shape, False, self.dtype)
            ok = ok and len(data) - f.tell() == self.nbytes - n
        except Exception:  # numpy raises several types for a damaged header; all mean "not this array"
            ok = False
        if not ok:
            raise CorruptShardError(
                f"{url}: corrupt {name}: expected a {self.dtype} .npy of shape {self.shape} "
                f"({self.nbytes} bytes), got {len(data)} bytes starting {bytes(data[:10])!r}"
            )
        return memoryview(data)[f.tell() :]


def split_name(name: str) -> tuple[str, str]:
    """``("dir/key", "image.npy")`` of a member name ``dir/key.image.npy`` (keys have no dots)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext


# ----------------------------------------------------------------------------------------------
# the manifest
# ----------------------------------------------------------------------------------------------


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name that stays inside its directory when joined onto it.

    No path separators, no leading dot (``.``, ``..``, hidden files), no ``:`` (so no URL scheme
    such as ``pipe:``, which webdataset would run as a shell command).
    """
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(c in name for c in "/\\:\x00")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_shape(v: Any, ndim: int, volume: bool = False) -> bool:
    """A slice shape of ``ndim`` positive sizes, or a volume's: ``ndim + 1`` entries, the spatial ones null."""
    if volume:
        return isinstance(v, list) and len(v) == ndim + 1 and all(d is None for d in v[-3:]) and (
            ndim == 2 or (_is_count(v[0]) and v[0] > 0))
    return isinstance(v, list) and len(v) == ndim and all(_is_count(d) and d > 0 for d in v)


def _check_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """Check the fields readers use; every problem is one ValueError line naming ``mpath`` and the entry."""
    if "splits" in manifest:
        splits = manifest["splits"]
        if not isinstance(splits, dict) or not splits:
            raise ValueError(f"{mpath}: 'splits' must be a non-empty mapping of split name to entry")
        for name, entry in splits.items():
            d = entry.get("dir") if isinstance(entry, dict) else None
            if not plain_name(d):
                raise ValueError(f"{mpath}: splits.{name}.dir {d!r} is not a plain directory name inside "
                                 f"{mpath.parent} (no '/', no leading '.', no ':')")
        return
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{mpath}: 'shards' must be a list of shard entries")
    for i, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not plain_name(name):
            raise ValueError(f"{mpath}: shards[{i}].name {name!r} is not a plain file name inside the shard "
                             f"directory (no '/', no leading '.', no URL scheme such as 'pipe:')")
        assert isinstance(entry, dict)  # for the type checker: plain_name(None) is False
        for key in ("samples", "bytes"):
            if not _is_count(entry.get(key)):
                raise ValueError(f"{mpath}: shards[{i}].{key} {entry.get(key)!r} must be a non-negative integer")
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"{mpath}: shards[{i}].sha256 {sha!r} must be 64 lower-case hex digits")
    layout = manifest.get("layout", "slice")
    if layout not in ("slice", "volume"):
        raise ValueError(f"{mpath}: layout {layout!r} must be 'slice' or 'volume'")
    volume = layout == "volume"  # volumes: the spatial sizes are null (each sample has its own)
    sample = manifest.get("sample")
    image = sample.get(IMAGE) if isinstance(sample, dict) else None
    want = "[C, null, null, null]" if volume else "[C, H, W]"
    if not (isinstance(image, dict) and image.get("dtype") == IMAGE_DTYPE and _is_shape(image.get("shape"), 3, volume)):
        raise ValueError(f"{mpath}: sample.{IMAGE} {image!r} must be {{'dtype': '{IMAGE_DTYPE}', 'shape': {want}}}")
    label = sample.get(LABEL)
    if label is not None and not (isinstance(label, dict) and label.get("dtype") == LABEL_DTYPE
                                  and _is_shape(label.get("shape"), 2, volume)):
        want = "[null, null, null]" if volume else "[H, W]"
        raise ValueError(f"{mpath}: sample.{LABEL} {label!r} must be null or "
                         f"{{'dtype': '{LABEL_DTYPE}', 'shape': {want}}}")


def read_manifest_file(mpath: str | Path) -> dict[str, Any]:
    """Read and check one ``manifest.json`` (shard names, counts, digests, sample layout).

    Raises:
        FileNotFoundError: there is no file at ``mpath``.
        ValueError: unreadable, not an :data:`FORMAT` manifest, or an entry readers cannot use
            (e.g. a shard name that is not a plain file name), naming ``mpath`` and the entry.
    """
    mpath = Path(mpath)
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{mpath}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not an {FORMAT} manifest")
    _check_manifest(manifest, mpath)
    return manifest


def read_manifest(path: str | Path, split: str = "train") -> tuple[Path, dict[str, Any]]:
    """Find and read the manifest of a shard directory.

    Args:
        path: a shard directory, or a split output (``train/`` + ``val/``) directory.
        split: which split to use when ``path`` holds several.

    Returns:
        (the shard directory, its manifest).

    Raises:
        ValueError: no manifest, a manifest of another format or with unusable entries, an
            unknown split, or a split whose manifest names splits again.
    """
    path = Path(path)
    mpath = path / MANIFEST
    try:
        manifest = read_manifest_file(mpath)
    except FileNotFoundError:
        raise ValueError(f"{mpath}: not found; is {path} a shard directory (make_shards.py output)?") from None
    if "splits" not in manifest:
        return path, manifest
    if split not in manifest["splits"]:
        raise ValueError(f"{mpath}: split {split!r} not found (have {', '.join(manifest['splits'])})")
    sub = path / manifest["splits"][split]["dir"]
    try:
        sub_manifest = read_manifest_file(sub / MANIFEST)
    except FileNotFoundError:
        raise ValueError(f"{mpath}: split {split!r} names {sub}, which holds no {MANIFEST}") from None
    if "splits" in sub_manifest:  # one level only: a split names a shard directory, never splits again
        raise ValueError(f"{sub / MANIFEST}: the {split!r} split of {mpath} must be a shard directory, "
                         f"but its manifest names splits again")
    return sub, sub_manifest


def manifest_preprocess(manifest: Any) -> dict[str, Any]:
    """The preprocessing parameters a manifest records (``{}`` with a warning when it has none)."""
    if isinstance(manifest, dict) and isinstance(manifest.get("preprocess"), dict):
        return dict(manifest["preprocess"])
    logger.warning("shard manifest has no preprocessing parameters; an export records none")
    return {}


def manifest_subjects(manifest: Any) -> list[str] | None:
    """The subject ids a shard directory holds (all its splits), or ``None`` when its manifest lists none."""
    if not isinstance(manifest, dict):
        return None
    if isinstance(manifest.get("subjects"), list):
        return sorted(str(s["id"]) if isinstance(s, dict) else str(s) for s in manifest["subjects"])
    splits = manifest.get("splits")
    if isinstance(splits, dict) and all(isinstance(v, dict) and isinstance(v.get("subjects"), list)
                                        for v in splits.values()):
        return sorted(str(i) for v in splits.values() for i in v["subjects"])
    return None


def meta_fields(manifest: Any) -> list[str] | None:
    """The ``meta.json`` fields a manifest lists for its samples (``None`` when it lists none)."""
    fields = manifest.get("sample", {}).get(META) if isinstance(manifest, dict) else None
    return list(fields) if isinstance(fields, list) else None


def check_meta(meta: Any, volume: bool = False) -> None:
    """Check the ``meta.json`` fields the loader delivers (``subject``, and ``slice`` and ``position``
    of a slice, or ``shape`` of a volume).

    Raises:
        ValueError: not an object, a missing field, or a value of the wrong type or range.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"expected an object, got {type(meta).__name__}")
    subject, slice_, position = meta.get("subject"), meta.get("slice"), meta.get("position")
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject {subject!r} must be a non-empty string")
    if volume:
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) != 3 or not all(type(n) is int and n > 0 for n in shape):
            raise ValueError(f"shape {shape!r} must be three positive integers (D, H, W)")
        spacing = meta.get("spacing")
        if not isinstance(spacing, list) or len(spacing) != 3 or not all(
                type(s) in (int, float) and s > 0 for s in spacing):
            raise ValueError(f"spacing {spacing!r} must be three positive numbers (D, H, W) mm")
        return
    if isinstance(slice_, bool) or not isinstance(slice_, int) or slice_ < 0:
        raise ValueError(f"slice {slice_!r} must be a non-negative integer")
    if isinstance(position, bool) or not isinstance(position, (int, float)) or not 0.0 <= position <= 1.0:
        raise ValueError(f"position {position!r} must be a number in [0, 1]")  # NaN fails the range test too
