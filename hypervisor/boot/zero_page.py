"""The Linux zero page (`struct boot_params`) and its embedded setup header.

Offsets are those of Documentation/x86/boot.rst ("THE REAL-MODE KERNEL HEADER" and "DETAILS OF
HEADER FIELDS") and Documentation/x86/zero-page.rst, i.e. arch/x86/include/uapi/asm/bootparam.h.
tests/unit/test_boot_zero_page.py pins them, and compares them with the C compiler's view of
`struct boot_params` when the compiled module is available.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from hypervisor.boot.layout import E820_MAX_ENTRIES_ZEROPAGE, ZERO_PAGE_SIZE, E820Entry
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

# --- boot_params fields outside the setup header (zero-page.rst) ---
ACPI_RSDP_ADDR_OFFSET = 0x070
EXT_RAMDISK_IMAGE_OFFSET = 0x0C0
EXT_RAMDISK_SIZE_OFFSET = 0x0C4
EXT_CMD_LINE_PTR_OFFSET = 0x0C8
E820_ENTRIES_OFFSET = 0x1E8
SENTINEL_OFFSET = 0x1EF
SETUP_HEADER_OFFSET = 0x1F1
E820_TABLE_OFFSET = 0x2D0
E820_ENTRY_FORMAT = "<QQI"  # struct boot_e820_entry: addr, size, type (packed, 20 bytes)
E820_ENTRY_SIZE = struct.calcsize(E820_ENTRY_FORMAT)

# --- setup header fields: name -> (offset in boot_params / in the bzImage, struct format) ---
SETUP_HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, "B"),
    "root_flags": (0x1F2, "H"),
    "syssize": (0x1F4, "I"),
    "ram_size": (0x1F8, "H"),
    "vid_mode": (0x1FA, "H"),
    "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "realmode_swtch": (0x208, "I"),
    "start_sys_seg": (0x20C, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "setup_move_size": (0x212, "H"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "bootsect_kludge": (0x220, "I"),
    "heap_end_ptr": (0x224, "H"),
    "ext_loader_ver": (0x226, "B"),
    "ext_loader_type": (0x227, "B"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "hardware_subarch_data": (0x240, "Q"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
    "handover_offset": (0x264, "I"),
    "kernel_info_offset": (0x268, "I"),
}
SETUP_HEADER_END = 0x26C  # end of struct setup_header as of protocol 2.15

# boot.rst constants.
BOOT_FLAG = 0xAA55
HEADER_MAGIC = 0x53726448  # "HdrS" read as a little-endian u32
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "no assigned boot loader id"
LOADFLAG_LOADED_HIGH = 0x01  # protected-mode code is loaded at 0x100000 (bzImage)
LOADFLAG_KEEP_SEGMENTS = 0x40
LOADFLAG_CAN_USE_HEAP = 0x80  # heap_end_ptr is valid
XLF_KERNEL_64 = 0x01  # has the legacy 64-bit entry point at 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
OLD_CMDLINE_MAX = 255  # boot.rst: "for protocol 2.05 and earlier, the maximum size is 255"
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: for protocol 2.02 and earlier
# The real-mode code is not run by a 64-bit or 32-bit entry, but boot.rst asks a loader that
# sets CAN_USE_HEAP to give the heap end as an offset from the real-mode base minus 0x200;
# 0xfe00 is the largest such heap in a 64 KiB real-mode segment (what QEMU passes too).
HEAP_END_PTR = 0xFE00


def field_offset(name: str) -> int:
    return SETUP_HEADER_FIELDS[name][0]


class ZeroPage:
    """A 4 KiB `struct boot_params` being filled in, written to guest memory at the end.

    Starts all zero (so the sentinel at 0x1ef is 0 and the kernel trusts the fields we leave
    zero, boot.rst "Sentinel"), then takes the setup header copied from a bzImage (bytes 0x1f1
    to 0x202 + the byte at 0x201, see bzimage.parse_bzimage) or built for an ELF vmlinux.
    """

    def __init__(self) -> None:
        self.data = bytearray(ZERO_PAGE_SIZE)

    def get(self, name: str) -> int:
        offset, fmt = SETUP_HEADER_FIELDS[name]
        return struct.unpack_from("<" + fmt, self.data, offset)[0]

    def set(self, name: str, value: int) -> None:
        offset, fmt = SETUP_HEADER_FIELDS[name]
        struct.pack_into("<" + fmt, self.data, offset, value)

    def set_ramdisk(self, address: int, size: int) -> None:
        self.set("ramdisk_image", address & 0xFFFFFFFF)
        self.set("ramdisk_size", size & 0xFFFFFFFF)
        # The high halves live outside the header (zero-page.rst, protocol 2.12).
        struct.pack_into("<I", self.data, EXT_RAMDISK_IMAGE_OFFSET, address >> 32)
        struct.pack_into("<I", self.data, EXT_RAMDISK_SIZE_OFFSET, size >> 32)

    def set_cmdline(self, address: int) -> None:
        self.set("cmd_line_ptr", address & 0xFFFFFFFF)
        struct.pack_into("<I", self.data, EXT_CMD_LINE_PTR_OFFSET, address >> 32)

    def set_acpi_rsdp(self, address: int) -> None:
        """boot_params.acpi_rsdp_addr (zero-page.rst, protocol 2.14): where the RSDP is, so the
        kernel need not scan the BIOS area for it."""
        struct.pack_into("<Q", self.data, ACPI_RSDP_ADDR_OFFSET, address)

    def set_e820(self, entries: Iterable[E820Entry]) -> None:
        entries = list(entries)
        if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
            raise BootError(f"{len(entries)} e820 entries do not fit the zero page's 128")
        self.data[E820_ENTRIES_OFFSET] = len(entries)
        for index, entry in enumerate(entries):
            struct.pack_into(E820_ENTRY_FORMAT, self.data, E820_TABLE_OFFSET + index * E820_ENTRY_SIZE,
                             entry.address, entry.size, entry.type)

    def e820(self) -> list[E820Entry]:
        count = self.data[E820_ENTRIES_OFFSET]
        offsets = (E820_TABLE_OFFSET + index * E820_ENTRY_SIZE for index in range(count))
        return [E820Entry(*struct.unpack_from(E820_ENTRY_FORMAT, self.data, offset)) for offset in offsets]

    def write_to(self, memory: GuestMemory, gpa: int) -> None:
        memory.write(gpa, self.data)


def read_zero_page(memory: GuestMemory, gpa: int) -> ZeroPage:
    """The zero page at `gpa` (for tests and the debugger)."""
    page = ZeroPage()
    page.data[:] = memory.read(gpa, ZERO_PAGE_SIZE)
    return page
