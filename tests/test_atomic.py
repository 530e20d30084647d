"""Atomic writes: the old file survives a failed write, and the new one is an ordinary file."""

from __future__ import annotations

import os

import pytest

from dymu.atomic import write_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path) -> None:
    path = write_text_atomic(tmp_path / "r.json", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
