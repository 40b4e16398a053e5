"""Multiboot (version 1) kernels, per the Multiboot Specification 0.6.96.

kvm-unit-tests ship their x86 tests as multiboot ELFs. §3.1 defines the header the kernel carries
(magic 0x1BADB002 in the first 8192 bytes, 32-bit aligned, with a checksum), §3.2 the machine
state at entry (EAX = 0x2BADB002, EBX = the multiboot information, 32-bit flat protected mode,
paging off, interrupts off) and §3.3 the information structure. Like QEMU (hw/i386/multiboot.c)
the command line given to the kernel is the caller's, and a kvm-unit-tests kernel expects its
own name as the first word, so `prepare_multiboot` can prepend one.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from hypervisor.boot import layout
from hypervisor.boot.cpu_state import protected_mode_flat_state
from hypervisor.boot.elf import load_segments, parse_elf
from hypervisor.boot.image_format import decompress_if_xz, multiboot_header_offset
from hypervisor.boot.layout import GuestLayout, KiB, MiB
from hypervisor.boot.placement import BootImage, MemoryPlan, place_initrd, write_cmdline
from hypervisor.boot.platform_tables import write_platform_tables
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002  # §3.2: EAX at entry
# §3.1.2 header flags: bits 0-15 are requirements a loader must honour or refuse the kernel.
HEADER_PAGE_ALIGN_MODULES = 1 << 0
HEADER_MEMORY_INFO = 1 << 1
HEADER_VIDEO_MODE = 1 << 2
HEADER_AOUT_KLUDGE = 1 << 16  # the address fields (§3.1.3) are valid
SUPPORTED_REQUIREMENTS = HEADER_PAGE_ALIGN_MODULES | HEADER_MEMORY_INFO
REQUIREMENT_MASK = 0xFFFF
# §3.3 information structure flags and layout.
INFO_MEMORY = 1 << 0  # mem_lower, mem_upper
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_SIZE = 88  # up to and including the VBE fields; the framebuffer fields are not given
INFO_FLAGS, INFO_MEM_LOWER, INFO_MEM_UPPER = 0, 4, 8
INFO_CMDLINE_OFFSET, INFO_MODS_COUNT, INFO_MODS_ADDR = 16, 20, 24
INFO_MMAP_LENGTH, INFO_MMAP_ADDR = 44, 48
INFO_BOOT_LOADER_NAME_OFFSET = 64
MODULE_FORMAT = "<IIII"  # mod_start, mod_end, string, reserved
MMAP_ENTRY_FORMAT = "<IQQI"  # size (of the rest, 20), base_addr, length, type
MMAP_ENTRY_SIZE_FIELD = 20
BOOT_LOADER_NAME = b"pyhv\0"
MODULE_STRING = b"initrd\0"
MULTIBOOT_CMDLINE_LIMIT = layout.CMDLINE_MAX_SIZE - 1
FOUR_GIB = 1 << 32


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # of the magic in the file
    flags: int
    # §3.1.3, valid with HEADER_AOUT_KLUDGE only.
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def mem_upper_kib(guest: GuestLayout) -> int:
    """KiB of contiguous RAM from 1 MiB up to the first hole (§3.3 mem_upper)."""
    return (guest.low_ram_end - MiB) // KiB


def find_multiboot_header(data: bytes) -> MultibootHeader | None:
    """The first valid header in the first 8 KiB (§3.1.1), or None."""
    offset = multiboot_header_offset(data)
    if offset is None:
        return None
    (flags,) = struct.unpack_from("<I", data, offset + 4)
    if flags & HEADER_AOUT_KLUDGE:
        if offset + 32 > len(data):
            raise BootError("the multiboot header is truncated before its address fields")
        return MultibootHeader(offset, flags, *struct.unpack_from("<IIIII", data, offset + 12))
    return MultibootHeader(offset, flags)


@dataclass(frozen=True)
class AoutLoad:
    """§3.1.3: `length` bytes from `file_start` go to load_addr, then bss up to `end`."""

    file_start: int
    length: int
    load_addr: int
    end: int


def aout_kludge_load(data: bytes, header: MultibootHeader, name: str) -> AoutLoad:
    """Check the a.out-kludge address fields against the file and work out what to copy."""
    if header.load_addr > header.header_addr:
        raise BootError(f"{name}: multiboot load_addr is above header_addr")
    file_start = header.offset - (header.header_addr - header.load_addr)
    if file_start < 0:
        raise BootError(f"{name}: multiboot header_addr/load_addr point before the start of the file")
    if header.load_end_addr:
        if header.load_end_addr < header.load_addr:
            raise BootError(f"{name}: multiboot load_end_addr is below load_addr")
        length = header.load_end_addr - header.load_addr
    else:
        length = len(data) - file_start
    if file_start + length > len(data):
        raise BootError(f"{name} is truncated: the multiboot header asks for more than the file holds")
    end = max(header.load_addr + length, header.bss_end_addr)
    return AoutLoad(file_start, length, header.load_addr, end)


def _load_aout(memory: GuestMemory, data: bytes, load: AoutLoad, name: str) -> None:
    if not memory.contains(load.load_addr, load.end - load.load_addr):
        raise BootError(f"{name} wants {load.load_addr:#x}-{load.end:#x}, outside guest RAM")
    memory.write(load.load_addr, data[load.file_start : load.file_start + load.length])
    memory.write(load.load_addr + load.length, bytes(load.end - load.load_addr - load.length))


def build_multiboot_info(gpa: int, guest: GuestLayout, cmdline_gpa: int,
                         module: tuple[int, int] | None) -> bytes:
    """The §3.3 information structure at `gpa`, then its module list, memory map and strings.

    `module` is the (start, end) of the initrd, when there is one.
    """
    info = bytearray(INFO_SIZE)
    tail = bytearray()
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME
    # mem_lower: KiB of RAM from 0 (at most 640); mem_upper: KiB from 1 MiB to the first hole.
    struct.pack_into("<II", info, INFO_MEM_LOWER, guest.e820[0].size // KiB, mem_upper_kib(guest))
    struct.pack_into("<I", info, INFO_CMDLINE_OFFSET, cmdline_gpa)
    mmap = b"".join(struct.pack(MMAP_ENTRY_FORMAT, MMAP_ENTRY_SIZE_FIELD, e.address, e.size, e.type)
                    for e in guest.e820)
    struct.pack_into("<II", info, INFO_MMAP_LENGTH, len(mmap), gpa + INFO_SIZE + len(tail))
    tail += mmap
    struct.pack_into("<I", info, INFO_BOOT_LOADER_NAME_OFFSET, gpa + INFO_SIZE + len(tail))
    tail += BOOT_LOADER_NAME
    if module:
        flags |= INFO_MODS
        string_gpa = gpa + INFO_SIZE + len(tail)
        tail += MODULE_STRING
        tail += bytes(-len(tail) % 4)  # keep the module list 32-bit aligned
        struct.pack_into("<II", info, INFO_MODS_COUNT, 1, gpa + INFO_SIZE + len(tail))
        tail += struct.pack(MODULE_FORMAT, module[0], module[1], string_gpa, 0)
    struct.pack_into("<I", info, INFO_FLAGS, flags)
    return bytes(info + tail)


def prepare_multiboot(memory: GuestMemory, guest: GuestLayout, kernel: bytes, cmdline: str = "",
                      initrd: bytes | None = None, cpus: int = 1, kernel_name: str | None = None,
                      name: str = "the kernel") -> BootImage:
    """Load a multiboot v1 kernel (ELF32, ELF64 below 4 GiB, or a.out kludge) and its info.

    `kernel_name`, when given, becomes the first word of the command line (as GRUB and QEMU
    pass it; kvm-unit-tests read it as argv[0]). The initrd becomes the one boot module.
    """
    kernel = decompress_if_xz(kernel, memory.size, "kernel")
    header = find_multiboot_header(kernel)
    if header is None:
        raise BootError(f"{name} has no multiboot header (magic 0x1BADB002) in its first 8 KiB")
    unsupported = header.flags & REQUIREMENT_MASK & ~SUPPORTED_REQUIREMENTS
    if unsupported & HEADER_VIDEO_MODE:
        raise BootError(f"{name} requires a multiboot video mode, which pyhv does not provide")
    if unsupported:
        raise BootError(f"{name} requires multiboot features pyhv does not know ({unsupported:#x})")
    plan = MemoryPlan()
    # The loader's own structures go first so that a kernel loaded over them is refused.
    plan.place("multiboot info", layout.BOOT_INFO_START, layout.BOOT_INFO_END - layout.BOOT_INFO_START)
    gdt, _ = write_platform_tables(memory, plan, cpus, long_mode=False)
    full_cmdline = " ".join(part for part in (kernel_name, cmdline.strip()) if part)
    cmdline_gpa = write_cmdline(memory, plan, layout.CMDLINE_START, full_cmdline, MULTIBOOT_CMDLINE_LIMIT)

    if header.flags & HEADER_AOUT_KLUDGE:
        load = aout_kludge_load(kernel, header, name)
        plan.place("kernel", load.load_addr, load.end - load.load_addr)
        _load_aout(memory, kernel, load, name)
        kernel_start, kernel_end = load.load_addr, load.end
        entry = header.entry_addr
    else:
        image = parse_elf(kernel, name)
        for index, segment in enumerate(image.loads):
            if segment.paddr + segment.memory_size > FOUR_GIB:
                raise BootError(f"{name}: multiboot segment {index} lies above 4 GiB")
            plan.place(f"kernel segment {index}", segment.paddr, segment.memory_size)
        kernel_start, kernel_end = load_segments(memory, image, name)
        entry = image.physical_entry()
    if entry >= FOUR_GIB:
        raise BootError(f"{name}: multiboot entry point {entry:#x} is above 4 GiB")

    module = None
    if initrd is not None:
        initrd = decompress_if_xz(initrd, memory.size, "initrd")
        # §3.3: modules are page aligned when the kernel asks (bit 0); place_initrd always is.
        address = place_initrd(memory, plan, initrd, kernel_end, FOUR_GIB, guest.low_ram_end)
        module = (address, address + len(initrd))
    info = build_multiboot_info(layout.BOOT_INFO_START, guest, cmdline_gpa, module)
    if len(info) > layout.BOOT_INFO_END - layout.BOOT_INFO_START:
        raise BootError("the multiboot information does not fit its reserved page")
    memory.write(layout.BOOT_INFO_START, info)

    state = protected_mode_flat_state(entry, gdt, stack=layout.BOOT_STACK_POINTER,
                                      rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=layout.BOOT_INFO_START)
    log.info("multiboot kernel %#x-%#x, entry %#x", kernel_start, kernel_end, entry)
    source = "multiboot a.out kludge" if header.flags & HEADER_AOUT_KLUDGE else "multiboot ELF"
    return BootImage(state, "multiboot", plan.placements, full_cmdline, source)

