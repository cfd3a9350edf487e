"""Atomic writes: readers see the old file or the whole new one; a failed write leaves no trace."""

from __future__ import annotations

import pytest

from ssl_pretrain.fileio import atomic_path, atomic_write_text


def test_replaces_whole_and_cleans_up_on_failure(tmp_path):
    dest = tmp_path / "sub" / "manifest.json"
    atomic_write_text(dest, "old")
    assert dest.read_text() == "old" and oct(dest.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in dest.parent.iterdir()] == ["manifest.json"]
    with atomic_path(dest, suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == dest.parent
        tmp.write_text("new")
    assert dest.read_text() == "new"
