"""Guest memory layout and e820 map (boot.rst "Memory layout", zero-page.rst e820_table)."""

from __future__ import annotations

import pytest

from hypervisor.boot import layout
from hypervisor.boot.layout import E820_RAM, E820_RESERVED, E820Entry, guest_layout, virtio_mmio_window
from hypervisor.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def test_small_guest_has_one_region_and_three_e820_entries():
    guest = guest_layout(128 * MiB)
    assert guest.memory_regions == ((0, 128 * MiB),)
    assert guest.e820 == (
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 127 * MiB, E820_RAM),
    )
    assert guest.low_ram_end == 128 * MiB


def test_large_guest_skips_the_mmio_hole():
    guest = guest_layout(6 * GiB)
    assert guest.memory_regions == ((0, 3 * GiB), (4 * GiB, 3 * GiB))
    assert guest.e820[-2] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)
    assert guest.e820[-1] == E820Entry(4 * GiB, 3 * GiB, E820_RAM)
    assert guest.low_ram_end == 3 * GiB
    ram = sum(e.size for e in guest.e820 if e.type == E820_RAM)
    reserved = sum(e.size for e in guest.e820 if e.type == E820_RESERVED)
    assert ram + reserved == 6 * GiB
    # Nothing in the e820 map covers the hole where the devices live.
    assert not any(e.address < 4 * GiB and e.end > 3 * GiB for e in guest.e820)


def test_exactly_3_gib_needs_no_high_region():
    assert guest_layout(3 * GiB).memory_regions == ((0, 3 * GiB),)


@pytest.mark.parametrize("size", [0, MiB, 2 * MiB + 1])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ConfigError):
        guest_layout(size)


def test_virtio_mmio_windows_are_in_the_hole_and_distinct():
    windows = [virtio_mmio_window(i) for i in range(layout.MAX_VIRTIO_MMIO_DEVICES)]
    assert windows[0].gpa == 0xD0000000 and windows[0].size == 0x1000 and windows[0].irq == 5
    assert windows[1].gpa == 0xD0001000 and windows[1].irq == 6
    assert windows[-1].irq == layout.IOAPIC_PINS - 1
    assert all(layout.MMIO_HOLE_START <= w.gpa and w.gpa + w.size <= layout.IOAPIC_ADDRESS for w in windows)
    assert windows[0].kernel_parameter() == "virtio_mmio.device=4K@0xd0000000:5"
    with pytest.raises(ConfigError):
        virtio_mmio_window(layout.MAX_VIRTIO_MMIO_DEVICES)


def test_gdt_fits_its_slot():
    from hypervisor.boot.cpu_state import GDT_ENTRY_COUNT

    assert layout.BOOT_GDT_START + GDT_ENTRY_COUNT * 8 == layout.BOOT_GDT_END


def test_low_memory_structures_do_not_overlap():
    ranges = sorted([
        (layout.BOOT_GDT_START, layout.BOOT_GDT_END),
        (layout.BOOT_INFO_START, layout.BOOT_INFO_END),
        (layout.ZERO_PAGE_START, layout.ZERO_PAGE_START + layout.ZERO_PAGE_SIZE),
        (layout.PML4_START, layout.PAGE_TABLES_END),
        (layout.CMDLINE_START, layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE),
        (layout.MPTABLE_START, layout.BIOS_AREA_END),
    ])
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end <= start
    # The stack grows down from just below the page tables, above the zero page.
    assert layout.ZERO_PAGE_START + layout.ZERO_PAGE_SIZE < layout.BOOT_STACK_POINTER < layout.PML4_START
