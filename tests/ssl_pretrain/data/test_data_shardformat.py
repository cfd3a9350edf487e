"""Shard format reader: ustar prefix, PAX and GNU long names, from a buffer and from a stream."""

from __future__ import annotations

import io
import tarfile

import pytest

from ssl_pretrain.data.shardformat import CorruptShardError, iter_tar_members, split_name

LONG = "d" * 60 + "/" + "k" * 120  # > 100 bytes: needs a PAX / GNU / ustar-prefix encoding


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(raw: bytes, as_stream: bool) -> list[tuple[str, bytes]]:
    src = io.BytesIO(raw) if as_stream else raw
    return [(n, bytes(d)) for n, d in iter_tar_members(src, "x.tar")]


MEMBERS = [
    (f"{LONG}.image.npy", b"\x01" * 700),  # a payload over one block, not a multiple of 512
    (f"{LONG}.meta.json", b"{}"),
    ("short.meta.json", b"[]"),  # a plain ustar header after an extended one: no long name leaks
]


@pytest.mark.parametrize("as_stream", [False, True])
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names(fmt: int, as_stream: bool) -> None:
    raw = _tar(MEMBERS, fmt)
    kind = b"x" if fmt == tarfile.PAX_FORMAT else b"L"
    assert raw[156:157] == kind  # the first header really is the extended-name header under test
    assert _read(raw, as_stream) == MEMBERS
    assert split_name(MEMBERS[0][0]) == (LONG, "image.npy")


@pytest.mark.parametrize("as_stream", [False, True])
def test_ustar_prefix_name(as_stream: bool) -> None:
    name = "p" * 90 + "/" + "n" * 90 + ".meta.json"  # fits ustar's 155-byte prefix + 100-byte name
    raw = _tar([(name, b"{}")], tarfile.USTAR_FORMAT)
    assert raw[156:157] == b"0" and raw[345:346] == b"p"
    assert _read(raw, as_stream) == [(name, b"{}")]


def test_pax_without_path_record_keeps_the_header_name() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.meta.json")
        info.size = 2
        info.pax_headers = {"comment": "no path here"}
        tar.addfile(info, io.BytesIO(b"{}"))
    raw = buf.getvalue()
    assert raw[156:157] == b"x"
    assert _read(raw, False) == [("k.meta.json", b"{}")]


def test_truncated_extended_header_names_the_shard() -> None:
    raw = _tar(MEMBERS[:1], tarfile.PAX_FORMAT)
    with pytest.raises(CorruptShardError, match=r"x\.tar: truncated shard \(reading extended header"):
        _read(raw[:600], False)
