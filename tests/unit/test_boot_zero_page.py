"""struct boot_params offsets (boot.rst, zero-page.rst), pinned and checked against the C compiler."""

from __future__ import annotations

import pytest

from hypervisor.boot.layout import E820Entry, guest_layout
from hypervisor.boot.zero_page import (
    E820_ENTRIES_OFFSET,
    E820_ENTRY_SIZE,
    E820_TABLE_OFFSET,
    EXT_CMD_LINE_PTR_OFFSET,
    EXT_RAMDISK_IMAGE_OFFSET,
    EXT_RAMDISK_SIZE_OFFSET,
    SETUP_HEADER_FIELDS,
    SETUP_HEADER_OFFSET,
    ZeroPage,
)
from hypervisor.errors import BootError

# From boot.rst "THE REAL-MODE KERNEL HEADER" table (offset, size).
BOOT_RST_HEADER = {
    "setup_sects": (0x1F1, 1), "root_flags": (0x1F2, 2), "syssize": (0x1F4, 4), "ram_size": (0x1F8, 2),
    "vid_mode": (0x1FA, 2), "root_dev": (0x1FC, 2), "boot_flag": (0x1FE, 2), "jump": (0x200, 2),
    "header": (0x202, 4), "version": (0x206, 2), "realmode_swtch": (0x208, 4), "start_sys_seg": (0x20C, 2),
    "kernel_version": (0x20E, 2), "type_of_loader": (0x210, 1), "loadflags": (0x211, 1),
    "setup_move_size": (0x212, 2), "code32_start": (0x214, 4), "ramdisk_image": (0x218, 4),
    "ramdisk_size": (0x21C, 4), "bootsect_kludge": (0x220, 4), "heap_end_ptr": (0x224, 2),
    "ext_loader_ver": (0x226, 1), "ext_loader_type": (0x227, 1), "cmd_line_ptr": (0x228, 4),
    "initrd_addr_max": (0x22C, 4), "kernel_alignment": (0x230, 4), "relocatable_kernel": (0x234, 1),
    "min_alignment": (0x235, 1), "xloadflags": (0x236, 2), "cmdline_size": (0x238, 4),
    "hardware_subarch": (0x23C, 4), "hardware_subarch_data": (0x240, 8), "payload_offset": (0x248, 4),
    "payload_length": (0x24C, 4), "setup_data": (0x250, 8), "pref_address": (0x258, 8),
    "init_size": (0x260, 4), "handover_offset": (0x264, 4), "kernel_info_offset": (0x268, 4),
}
SIZES = {"B": 1, "H": 2, "I": 4, "Q": 8}


def test_setup_header_fields_match_boot_rst():
    ours = {name: (offset, SIZES[fmt]) for name, (offset, fmt) in SETUP_HEADER_FIELDS.items()}
    assert ours == BOOT_RST_HEADER


def test_zero_page_offsets_match_zero_page_rst():
    assert SETUP_HEADER_OFFSET == 0x1F1
    assert E820_ENTRIES_OFFSET == 0x1E8
    assert E820_TABLE_OFFSET == 0x2D0
    assert E820_ENTRY_SIZE == 20
    assert (EXT_RAMDISK_IMAGE_OFFSET, EXT_RAMDISK_SIZE_OFFSET, EXT_CMD_LINE_PTR_OFFSET) == (0xC0, 0xC4, 0xC8)
    assert E820_TABLE_OFFSET + 128 * E820_ENTRY_SIZE <= 0xD00  # eddbuf at 0xd00 (zero-page.rst)


def test_offsets_agree_with_the_c_struct():
    fastpath = pytest.importorskip("hypervisor._fastpath", reason="compiled module not built")
    ffi = fastpath.ffi
    try:
        assert ffi.sizeof("struct boot_params") == 4096
        assert ffi.offsetof("struct boot_params", "hdr") == SETUP_HEADER_OFFSET
        assert ffi.offsetof("struct boot_params", "e820_entries") == E820_ENTRIES_OFFSET
        assert ffi.sizeof("struct boot_e820_entry") == E820_ENTRY_SIZE
    except ffi.error as error:  # the lead's cdef may not declare these
        pytest.skip(f"the compiled module does not describe struct boot_params: {error}")


def test_e820_table_round_trips_and_limits_entries():
    page = ZeroPage()
    entries = guest_layout(6 << 30).e820
    page.set_e820(entries)
    assert page.data[0x1E8] == 4
    assert tuple(page.e820()) == entries
    assert int.from_bytes(page.data[0x2D0 + 20 * 3 : 0x2D0 + 20 * 3 + 8], "little") == 4 << 30
    with pytest.raises(BootError, match="128"):
        page.set_e820([E820Entry(i * 4096, 4096, 1) for i in range(129)])


def test_ramdisk_and_cmdline_split_into_low_and_ext_fields():
    page = ZeroPage()
    page.set_ramdisk(0x1_2345_6000, 0x1_0000_1000)
    page.set_cmdline(0x20000)
    assert page.get("ramdisk_image") == 0x2345_6000
    assert page.get("ramdisk_size") == 0x1000
    assert int.from_bytes(page.data[0xC0:0xC4], "little") == 1
    assert int.from_bytes(page.data[0xC4:0xC8], "little") == 1
    assert page.get("cmd_line_ptr") == 0x20000
    assert int.from_bytes(page.data[0x228:0x22C], "little") == 0x20000
