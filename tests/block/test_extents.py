"""The one SEEK_DATA/SEEK_HOLE walker (hypervisor/block/extents.py) on real sparse files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypervisor.block.extents import data_ranges, file_extents, is_hole

MIB = 1 << 20


def _sparse(path: Path, size: int, data_at: list[int]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for offset in data_at:
        os.pwrite(fd, b"x" * MIB, offset)
    return fd


def _holes_supported(tmp_path: Path) -> bool:
    fd = _sparse(tmp_path / "probe", 4 * MIB, [])
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


def test_runs_alternate_and_cover_the_range(tmp_path: Path) -> None:
    if not _holes_supported(tmp_path):
        pytest.skip("this file system does not report holes")
    fd = _sparse(tmp_path / "f", 16 * MIB, [2 * MIB, 8 * MIB])
    try:
        runs = list(file_extents(fd, 0, 16 * MIB))
        assert runs[0] == (0, 2 * MIB, False)
        assert (2 * MIB, MIB, True) in runs and (8 * MIB, MIB, True) in runs
        assert runs[-1][2] is False and runs[-1][0] + runs[-1][1] == 16 * MIB
        for (a, alen, adata), (b, _, bdata) in zip(runs, runs[1:], strict=False):
            assert a + alen == b and adata != bdata
        assert list(data_ranges(fd, 0, 16 * MIB)) == [(2 * MIB, MIB), (8 * MIB, MIB)]
        # A window that starts inside data and ends inside a hole is clipped to the window.
        assert list(file_extents(fd, 2 * MIB + 5, 4 * MIB)) == [(2 * MIB + 5, MIB - 5, True), (3 * MIB, MIB, False)]
        assert is_hole(fd, 4 * MIB, MIB) and not is_hole(fd, MIB, 2 * MIB)
    finally:
        os.close(fd)


def test_past_the_end_of_the_file_is_a_hole(tmp_path: Path) -> None:
    fd = _sparse(tmp_path / "f", MIB, [0])
    try:
        assert list(file_extents(fd, 0, 3 * MIB)) == [(0, MIB, True), (MIB, 2 * MIB, False)]
        assert list(file_extents(fd, 5, 5)) == []
        assert is_hole(fd, 2 * MIB, MIB)
    finally:
        os.close(fd)
