"""bzImage header validation and loading through prepare_linux (Documentation/x86/boot.rst)."""

from __future__ import annotations

import lzma

import pytest

from hypervisor.boot import layout
from hypervisor.boot.bzimage import parse_bzimage
from hypervisor.boot.layout import guest_layout
from hypervisor.boot.linux import prepare_linux
from hypervisor.boot.page_tables import translate
from hypervisor.boot.zero_page import read_zero_page
from hypervisor.errors import BootError, ConfigError
from hypervisor.memory import GuestMemory
from tests.unit.test_boot_fixtures import MiB, make_bzimage, new_guest

KERNEL = bytes(range(256)) * 64


@pytest.fixture
def guest_64m():
    with new_guest(64 * MiB) as pair:
        yield pair


def test_valid_header_is_parsed():
    bz = parse_bzimage(make_bzimage(kernel=KERNEL))
    assert bz.protocol == 0x020F
    assert bz.setup_size == 5 * 512
    assert bytes(bz.kernel) == KERNEL
    assert bz.has_64bit_entry and bz.relocatable
    assert bz.cmdline_limit == 2047
    assert bz.init_size == 0x800000


def test_setup_sects_zero_means_four():
    bz = parse_bzimage(make_bzimage(setup_sects=0, kernel=KERNEL))
    assert bz.setup_size == 5 * 512
    assert bytes(bz.kernel) == KERNEL


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "truncated"),
        (make_bzimage()[:0x150], "truncated"),
        (make_bzimage()[:0x205], "truncated"),
        (make_bzimage()[: 5 * 512 + 100], "truncated"),  # shorter than syssize says
        (make_bzimage()[: 5 * 512], "truncated"),  # setup code only
        (make_bzimage(version=0x0201), "boot protocol 2.01"),
        (make_bzimage(loadflags=0), "zImage"),
        (make_bzimage(syssize=0x100000), "truncated"),
    ],
)
def test_bad_headers_raise_one_line_boot_errors(image, message):
    with pytest.raises(BootError, match=message) as error:
        parse_bzimage(image)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ConfigError)


def test_wrong_magic_is_not_a_bzimage():
    image = bytearray(make_bzimage())
    image[0x1FE] = 0
    with pytest.raises(BootError, match="0xAA55"):
        parse_bzimage(bytes(image))
    image = bytearray(make_bzimage())
    image[0x202:0x206] = b"HdrX"
    with pytest.raises(BootError, match="HdrS"):
        parse_bzimage(bytes(image))


def test_64bit_entry_zero_page_and_paging(guest_64m):
    guest, memory = guest_64m
    image = make_bzimage(kernel=KERNEL)
    boot = prepare_linux(memory, guest, image, "console=ttyS0", cpus=2)
    assert boot.protocol == "linux-64"
    load = 0x1000000  # pref_address: relocatable and init_size fits in 64 MiB
    assert memory.read(load, len(KERNEL)) == KERNEL
    assert boot.entry.rip == load + 0x200
    assert boot.entry.gprs["rsi"] == layout.ZERO_PAGE_START
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    assert page.get("boot_flag") == 0xAA55 and page.get("version") == 0x020F
    assert page.get("type_of_loader") == 0xFF
    assert page.get("loadflags") & 0x80  # CAN_USE_HEAP
    assert page.get("cmd_line_ptr") == layout.CMDLINE_START
    assert page.data[0x1EF] == 0  # the sentinel was not copied from the image
    assert memory.read(layout.CMDLINE_START, 14) == b"console=ttyS0\0"
    assert page.e820() == list(guest.e820)
    assert (page.get("ramdisk_image"), page.get("ramdisk_size")) == (0, 0)
    # The identity map covers the entry, the zero page and the command line.
    for address in (boot.entry.rip, layout.ZERO_PAGE_START, layout.CMDLINE_START):
        assert translate(memory, boot.entry.cr3, address) == address


def test_old_protocol_uses_the_32bit_entry(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(version=0x020A, xloadflags=0, kernel=KERNEL), "")
    assert boot.protocol == "linux-32"
    assert boot.entry.efer == 0 and not boot.entry.cr0 & (1 << 31)
    assert boot.entry.cs.db == 1 and boot.entry.cs.selector == 0x10
    assert boot.entry.rip == 0x1000000
    assert boot.entry.gprs == {"rsi": layout.ZERO_PAGE_START}


def test_protocol_212_without_xlf_kernel_64_uses_the_32bit_entry(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(version=0x020C, xloadflags=0), "")
    assert boot.protocol == "linux-32"


def test_non_relocatable_kernel_loads_at_1_mib(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(relocatable=0, kernel=KERNEL), "")
    assert memory.read(0x100000, len(KERNEL)) == KERNEL
    assert boot.entry.rip == 0x100200


def test_relocatable_kernel_falls_back_to_1_mib_when_pref_address_does_not_fit():
    guest = guest_layout(20 * MiB)
    memory = GuestMemory(list(guest.memory_regions))
    try:
        image = make_bzimage(kernel=KERNEL, pref_address=0x1000000, init_size=0x800000)
        with pytest.raises(BootError, match="too small"):
            # Loaded at 1 MiB it still unpacks at pref_address: 16 + 8 MiB do not fit in 20.
            prepare_linux(memory, guest, image, "")
        boot = prepare_linux(memory, guest, make_bzimage(kernel=KERNEL, pref_address=0x1000000, init_size=0x200000), "")
        assert boot.entry.rip == 0x1000200
    finally:
        memory.close()


def test_command_line_limit(guest_64m):
    guest, memory = guest_64m
    image = make_bzimage(cmdline_size=16)
    prepare_linux(memory, guest, image, "x" * 16)
    with pytest.raises(BootError, match="17 bytes, beyond the kernel's limit of 16"):
        prepare_linux(memory, guest, image, "x" * 17)


def test_old_protocol_command_line_limit_is_255(guest_64m):
    guest, memory = guest_64m
    image = make_bzimage(version=0x0205, xloadflags=0, cmdline_size=4096)
    prepare_linux(memory, guest, image, "y" * 255)
    with pytest.raises(BootError, match="limit of 255"):
        prepare_linux(memory, guest, image, "y" * 256)


def test_nul_in_command_line_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="NUL"):
        prepare_linux(memory, guest, make_bzimage(), "a\0b")


def test_virtio_mmio_devices_are_appended_to_the_command_line(guest_64m):
    guest, memory = guest_64m
    windows = [layout.virtio_mmio_window(0), layout.virtio_mmio_window(1)]
    boot = prepare_linux(memory, guest, make_bzimage(), "console=ttyS0", mmio_devices=windows)
    assert boot.cmdline == ("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6")
    assert memory.read(layout.CMDLINE_START, len(boot.cmdline) + 1) == boot.cmdline.encode() + b"\0"


def test_initrd_goes_high_below_initrd_addr_max(guest_64m):
    guest, memory = guest_64m
    initrd = b"070701" + bytes(100_000)
    boot = prepare_linux(memory, guest, make_bzimage(initrd_addr_max=0x37FFFFFF), "", initrd=initrd)
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    address, size = page.get("ramdisk_image"), page.get("ramdisk_size")
    assert size == len(initrd)
    assert address % 4096 == 0
    assert address + size <= 64 * MiB and address + size > 64 * MiB - 8192
    assert address >= 0x1000000 + 0x800000  # above the kernel's init_size footprint
    assert memory.read(address, len(initrd)) == initrd
    assert boot.find("initrd").gpa == address


def test_initrd_respects_a_low_initrd_addr_max(guest_64m):
    guest, memory = guest_64m
    prepare_linux(
        memory,
        guest,
        make_bzimage(relocatable=0, init_size=0x100000, initrd_addr_max=0x1FFFFFF),
        "",
        initrd=bytes(5000),
    )
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    assert page.get("ramdisk_image") + page.get("ramdisk_size") <= 0x2000000


def test_initrd_larger_than_ram_is_a_clear_error(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match=r"initrd of 80 MiB does not fit in 64 MiB of guest RAM"):
        prepare_linux(memory, guest, make_bzimage(), "", initrd=bytes(80 * MiB))


def test_xz_compressed_initrd_is_unpacked(guest_64m):
    guest, memory = guest_64m
    initrd = b"070701" * 1000
    prepare_linux(memory, guest, make_bzimage(), "", initrd=lzma.compress(initrd))
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    assert page.get("ramdisk_size") == len(initrd)
    assert memory.read(page.get("ramdisk_image"), len(initrd)) == initrd


def test_pvh_entry_is_refused_for_a_bzimage(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="PVH"):
        prepare_linux(memory, guest, make_bzimage(), "", entry="pvh")


@pytest.mark.parametrize("init_size", [0xFFFFFFFF, 0x80000000, 49 * MiB])
@pytest.mark.parametrize("unpack", [True, False])
def test_init_size_that_cannot_fit_in_guest_ram_is_refused(guest_64m, init_size, unpack):
    """boot.rst init_size: the memory the kernel needs from its run address (16 MiB here)."""
    guest, memory = guest_64m
    image = make_bzimage(kernel=KERNEL, init_size=init_size)
    with pytest.raises(BootError, match=rf"too small for the kernel: its init_size \({init_size:#x}\)"):
        prepare_linux(memory, guest, image, "", unpack_bzimage=unpack)
    boot = prepare_linux(memory, guest, make_bzimage(kernel=KERNEL, init_size=48 * MiB), "", unpack_bzimage=unpack)
    assert boot.entry.rip == 0x1000200
