"""block/capabilities.py: which optional capability each backend offers, as the image tools see
them (`isinstance`, never attribute probing)."""

from __future__ import annotations

import os
from pathlib import Path

from hypervisor.block.capabilities import AllocationMap, BackingChain, HostFile, Resizable
from hypervisor.block.open import open_disk
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2, create_raw
from hypervisor.block.tools.copying import data_ranges

MIB = 1 << 20


def test_qcow2_has_a_map_a_chain_and_a_resize_but_is_no_host_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(str(path), Qcow2CreateOptions(size=MIB))
    image = open_disk(str(path), read_only=True)
    try:
        assert isinstance(image, AllocationMap) and isinstance(image, BackingChain)
        assert isinstance(image, Resizable) and not isinstance(image, HostFile)
    finally:
        image.close()


def test_raw_is_a_host_file_whose_data_ranges_are_its_data_extents(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    create_raw(str(path), 4 * MIB)
    with open(path, "r+b") as file:  # one data run in the middle of a sparse file
        file.seek(2 * MIB)
        file.write(b"\x01" * 4096)
    image = open_disk(str(path), read_only=True, format="raw")
    try:
        assert isinstance(image, HostFile) and not isinstance(image, AllocationMap | BackingChain | Resizable)
        ranges = list(data_ranges(image))
        fd = os.open(path, os.O_RDONLY)
        try:
            supports_holes = os.lseek(fd, 0, os.SEEK_DATA) > 0
        finally:
            os.close(fd)
        if supports_holes:
            assert len(ranges) == 1 and ranges[0][0] <= 2 * MIB < ranges[0][0] + ranges[0][1] and ranges[0][2] == 0
        else:  # a file system that cannot tell: all data
            assert ranges == [(0, 4 * MIB, 0)]
    finally:
        image.close()
