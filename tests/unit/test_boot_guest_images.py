"""The bundled guest kernels in guest_images/ go through the loaders (skipped until they are built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.boot import layout
from hypervisor.boot.elf import parse_elf
from hypervisor.boot.image_format import decompress_if_xz
from hypervisor.boot.loader import prepare_kernel
from hypervisor.boot.page_tables import translate
from hypervisor.boot.pvh import pvh_entry_point
from hypervisor.boot.zero_page import read_zero_page
from tests.unit.test_boot_fixtures import MiB, new_guest

GUEST_IMAGES = Path(__file__).resolve().parents[2] / "guest_images"
KERNELS = ["vmlinux.xz", "bzImage"]  # the uncompressed vmlinux is not kept in git
RAM = 256 * MiB


def kernel_bytes(name: str) -> bytes:
    path = GUEST_IMAGES / name
    if not path.is_file():
        pytest.skip(f"guest_images/{name} is not built (guest_images/build.sh makes it)")
    return path.read_bytes()


@pytest.mark.parametrize("name", KERNELS)
def test_bundled_kernel_loads_through_the_64bit_entry(name):
    kernel = kernel_bytes(name)
    with new_guest(RAM) as (guest, memory):
        boot = prepare_kernel(memory, guest, kernel, "console=ttyS0", initrd=b"0707010" * 100, cpus=2,
                              mmio_devices=[layout.virtio_mmio_window(0)], name=name)
        assert boot.protocol == "linux-64"
        page = read_zero_page(memory, boot.entry.gprs["rsi"])
        assert page.get("boot_flag") == 0xAA55
        assert page.get("ramdisk_size") == 700
        assert translate(memory, boot.entry.cr3, boot.entry.rip) == boot.entry.rip
        # The first bytes at the entry are code, not zeros left by a bad copy.
        assert memory.read(boot.entry.rip, 16) != bytes(16)


@pytest.mark.parametrize("name", ["vmlinux.xz"])
def test_bundled_vmlinux_pvh_entry_when_the_kernel_has_one(name):
    kernel = decompress_if_xz(kernel_bytes(name), 1 << 30, "kernel")
    if pvh_entry_point(parse_elf(kernel)) is None:
        pytest.skip(f"guest_images/{name} is built without CONFIG_PVH")
    with new_guest(RAM) as (guest, memory):
        boot = prepare_kernel(memory, guest, kernel, "console=ttyS0", entry="pvh")
        assert boot.protocol == "pvh" and boot.entry.gprs["rbx"] == layout.BOOT_INFO_START


def test_bundled_bzimage_payload_is_the_bundled_vmlinux():
    bzimage = kernel_bytes("bzImage")
    with new_guest(RAM) as (guest, memory):
        boot = prepare_kernel(memory, guest, bzimage, "console=ttyS0", name="bzImage")
        if "unpacked" not in boot.source:
            pytest.skip(f"the bundled bzImage's payload codec is left to the guest ({boot.source})")
        unpacked_entry = boot.entry.rip
    vmlinux = decompress_if_xz(kernel_bytes("vmlinux.xz"), 1 << 30, "kernel")
    assert parse_elf(vmlinux).physical_entry() == unpacked_entry


def test_bundled_bzimage_through_its_own_decompressor():
    with new_guest(RAM) as (guest, memory):
        boot = prepare_kernel(memory, guest, kernel_bytes("bzImage"), "", unpack_bzimage=False)
        assert boot.source == "bzImage" and boot.entry.rip == boot.find("kernel").gpa + 0x200
