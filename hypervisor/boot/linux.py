"""Loading a Linux kernel: bzImage or ELF vmlinux, initrd, command line, zero page or PVH info.

`prepare_linux` is what the machine calls. It writes everything into guest memory and returns a
`BootImage` whose `entry` the machine loads into the boot vCPU:

- bzImage with XLF_KERNEL_64 (protocol 2.12+): boot.rst "64-bit BOOT PROTOCOL", RSI = zero page,
  RIP = load address + 0x200, identity-mapped paging;
- older bzImage: boot.rst "32-bit BOOT PROTOCOL", ESI = zero page, EIP = load address;
- ELF vmlinux: the same 64-bit entry at e_entry (physical), with a zero page pyhv builds (a
  vmlinux has no setup header to copy), or, when asked (`entry="pvh"`) and the kernel has the
  XEN_ELFNOTE_PHYS32_ENTRY note, the PVH entry with EBX = hvm_start_info.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hypervisor.boot import layout
from hypervisor.boot.acpi import ACPI_TABLES_START
from hypervisor.boot.bzimage import (
    PROTOCOL_CMDLINE_SIZE,
    STARTUP_64_OFFSET,
    BzImage,
    check_footprint,
    choose_load_address,
    footprint_end,
    load_bzimage,
    parse_bzimage,
)
from hypervisor.boot.cpu_state import (
    EntryState,
    long_mode_state,
    protected_mode_flat_state,
)
from hypervisor.boot.elf import EM_X86_64, ElfImage, load_segments, parse_elf
from hypervisor.boot.image_format import decompress_if_xz, detect_kernel_format
from hypervisor.boot.layout import HIMEM_START, GuestLayout, MmioWindow
from hypervisor.boot.payload import unpack_payload
from hypervisor.boot.placement import BootImage, MemoryPlan, place_initrd, write_cmdline
from hypervisor.boot.platform_tables import write_platform_tables
from hypervisor.boot.pvh import pvh_entry_point, write_start_info
from hypervisor.boot.zero_page import (
    BOOT_FLAG,
    DEFAULT_INITRD_ADDR_MAX,
    HEADER_MAGIC,
    HEAP_END_PTR,
    LOADFLAG_CAN_USE_HEAP,
    LOADFLAG_LOADED_HIGH,
    OLD_CMDLINE_MAX,
    TYPE_OF_LOADER_UNDEFINED,
    ZeroPage,
)
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

LinuxEntry = Literal["auto", "linux-64", "pvh"]

# A vmlinux has no setup header, so pyhv writes one for it with the values of a current kernel:
# protocol 2.15, x86 COMMAND_LINE_SIZE 2048 (so 2047 characters plus the NUL), 2 MiB alignment
# (CONFIG_PHYSICAL_ALIGN's default on x86-64, arch/x86/Kconfig).
VMLINUX_PROTOCOL = 0x020F
VMLINUX_CMDLINE_LIMIT = 2047
VMLINUX_KERNEL_ALIGNMENT = 0x200000


def with_mmio_devices(cmdline: str, devices: Sequence[MmioWindow]) -> str:
    """`cmdline` plus a virtio_mmio.device= parameter per device (no ACPI or DT tells Linux)."""
    parameters = [cmdline.strip()] + [device.kernel_parameter() for device in devices]
    return " ".join(p for p in parameters if p)


def _vmlinux_zero_page(cmdline_limit: int) -> ZeroPage:
    page = ZeroPage()
    page.set("boot_flag", BOOT_FLAG)
    page.set("header", HEADER_MAGIC)
    page.set("version", VMLINUX_PROTOCOL)
    page.set("loadflags", LOADFLAG_LOADED_HIGH)
    page.set("kernel_alignment", VMLINUX_KERNEL_ALIGNMENT)
    page.set("cmdline_size", cmdline_limit)
    page.set("initrd_addr_max", DEFAULT_INITRD_ADDR_MAX)
    return page


def _bzimage_zero_page(kernel: BzImage, load_address: int) -> ZeroPage:
    page = ZeroPage()
    page.data[:] = kernel.header.data
    page.set("loadflags", page.get("loadflags") | LOADFLAG_CAN_USE_HEAP)
    page.set("heap_end_ptr", HEAP_END_PTR)
    page.set("code32_start", load_address)
    return page


@dataclass
class _LoadedKernel:
    """What loading the kernel proper decided, for the common steps that follow."""

    rip: int
    protocol: str  # "linux-64", "linux-32" or "pvh"
    kernel_end: int  # the initrd goes above this
    page: ZeroPage
    cmdline_limit: int
    initrd_max: int
    source: str = "ELF vmlinux"


def _load_elf(
    memory: GuestMemory, plan: MemoryPlan, kernel: bytes, entry: LinuxEntry, name: str, page: ZeroPage | None = None
) -> _LoadedKernel:
    """A vmlinux; `page` is the zero page to use (a bzImage's header when it came from one)."""
    image = parse_elf(kernel, name)
    if image.machine != EM_X86_64:
        raise BootError(f"{name} is not an x86-64 ELF kernel")
    rip, protocol = _elf_entry(image, entry, name)
    for index, segment in enumerate(image.loads):
        plan.place(f"kernel segment {index}", segment.paddr, segment.memory_size)
    _, kernel_end = load_segments(memory, image, name)
    if page is None:
        page = _vmlinux_zero_page(VMLINUX_CMDLINE_LIMIT)
        return _LoadedKernel(rip, protocol, kernel_end, page, VMLINUX_CMDLINE_LIMIT, DEFAULT_INITRD_ADDR_MAX)
    return _LoadedKernel(rip, protocol, kernel_end, page, _cmdline_limit(page), page.get("initrd_addr_max"))


def _cmdline_limit(page: ZeroPage) -> int:
    return page.get("cmdline_size") if page.get("version") >= PROTOCOL_CMDLINE_SIZE else OLD_CMDLINE_MAX


def _bzimage_payload(bz: BzImage, limit: int, name: str) -> tuple[str, bytes] | None:
    """(codec, the bzImage's vmlinux unpacked on the host), or None when the guest must unpack it."""
    if not bz.has_64bit_entry:
        return None
    payload = bz.payload
    if not payload:
        return None
    unpacked = unpack_payload(payload, limit)  # a view: the 10+ MB payload is not copied
    if unpacked is None:
        return None
    codec, vmlinux = unpacked
    try:
        if detect_kernel_format(vmlinux) != "elf64":
            return None
    except BootError:
        log.warning("%s: the %s payload is not an x86-64 ELF; the guest will unpack it", name, codec)
        return None
    log.info("%s: unpacked its %s payload on the host (%d bytes)", name, codec, len(vmlinux))
    return codec, vmlinux


def _load_bzimage(
    memory: GuestMemory, plan: MemoryPlan, kernel: bytes, low_end: int, unpack: bool, name: str
) -> _LoadedKernel:
    bz = parse_bzimage(kernel, name)
    # Checked before anything is unpacked: the kernel needs init_size from its run address.
    check_footprint(bz, choose_load_address(bz, low_end), low_end, name)
    unpacked = _bzimage_payload(bz, memory.size, name) if unpack else None
    if unpacked is not None:
        # What the bzImage's own decompressor would do: the vmlinux at its physical addresses,
        # entered at startup_64 with the zero page the bootloader filled from the setup header.
        codec, vmlinux = unpacked
        loaded = _load_elf(memory, plan, vmlinux, "linux-64", name, _bzimage_zero_page(bz, HIMEM_START))
        loaded.source = f"bzImage ({codec} payload unpacked on the host)"
        return loaded
    load_address = load_bzimage(memory, bz, low_end, name)
    kernel_end = footprint_end(bz, load_address)
    plan.place("kernel", load_address, kernel_end - load_address)
    page = _bzimage_zero_page(bz, load_address)
    if bz.has_64bit_entry:
        return _LoadedKernel(
            load_address + STARTUP_64_OFFSET,
            "linux-64",
            kernel_end,
            page,
            bz.cmdline_limit,
            bz.initrd_addr_max,
            "bzImage",
        )
    return _LoadedKernel(load_address, "linux-32", kernel_end, page, bz.cmdline_limit, bz.initrd_addr_max, "bzImage")


def prepare_linux(
    memory: GuestMemory,
    guest: GuestLayout,
    kernel: bytes,
    cmdline: str,
    initrd: bytes | None = None,
    cpus: int = 1,
    mmio_devices: Sequence[MmioWindow] = (),
    entry: LinuxEntry = "auto",
    name: str = "the kernel",
    unpack_bzimage: bool = True,
) -> BootImage:
    """Load a Linux bzImage or ELF vmlinux (either may be xz-compressed) and everything it needs.

    `memory` must have been built from `guest.memory_regions`. `entry` picks the ELF entry:
    "auto" and "linux-64" use the 64-bit boot protocol with a zero page; "pvh" the PVH entry.
    `unpack_bzimage`: decompress a 64-bit bzImage's payload on the host (gzip, bzip2, lzma, xz,
    lz4) and enter the vmlinux directly, as its decompressor would; False boots the bzImage
    itself. Raises BootError (one line) for anything that cannot boot.
    """
    kernel = decompress_if_xz(kernel, memory.size, "kernel")
    kind = detect_kernel_format(kernel, name)
    if kind == "multiboot":
        raise BootError(f"{name} is a multiboot kernel, not Linux; load it with prepare_multiboot")
    if kind == "bzimage" and entry == "pvh":
        raise BootError(f"{name} is a bzImage; the PVH entry needs an ELF vmlinux with a PVH note")
    if initrd is not None:
        initrd = decompress_if_xz(initrd, memory.size, "initrd")
    full_cmdline = with_mmio_devices(cmdline, mmio_devices)
    low_end = guest.low_ram_end
    plan = MemoryPlan()
    if kind == "bzimage":
        loaded = _load_bzimage(memory, plan, kernel, low_end, unpack_bzimage, name)
    else:
        loaded = _load_elf(memory, plan, kernel, entry, name)
    rip, protocol, kernel_end, page = loaded.rip, loaded.protocol, loaded.kernel_end, loaded.page
    cmdline_limit, initrd_max = loaded.cmdline_limit, loaded.initrd_max
    long_mode = protocol == "linux-64"

    cmdline_limit = min(cmdline_limit, layout.CMDLINE_MAX_SIZE - 1)
    cmdline_gpa = write_cmdline(memory, plan, layout.CMDLINE_START, full_cmdline, cmdline_limit)
    initrd_range: tuple[int, int] | None = None
    if initrd is not None:
        initrd_gpa = place_initrd(memory, plan, initrd, kernel_end, initrd_max + 1, low_end)
        initrd_range = (initrd_gpa, len(initrd))
    gdt, pml4 = write_platform_tables(memory, plan, cpus, long_mode)

    if protocol == "pvh":
        plan.place("PVH start info", layout.BOOT_INFO_START, layout.BOOT_INFO_END - layout.BOOT_INFO_START)
        write_start_info(memory, layout.BOOT_INFO_START, layout.BOOT_INFO_END, cmdline_gpa, guest.e820, initrd_range)
        state: EntryState = protected_mode_flat_state(
            rip, gdt, stack=layout.BOOT_STACK_POINTER, rbx=layout.BOOT_INFO_START
        )
    else:
        page.set_cmdline(cmdline_gpa)
        page.set("type_of_loader", TYPE_OF_LOADER_UNDEFINED)
        if initrd_range:
            page.set_ramdisk(*initrd_range)
        page.set_e820(guest.e820)
        # The RSDP is the first of the ACPI tables write_platform_tables puts there (acpi.py).
        page.set_acpi_rsdp(ACPI_TABLES_START)
        plan.place("zero page", layout.ZERO_PAGE_START, layout.ZERO_PAGE_SIZE)
        page.write_to(memory, layout.ZERO_PAGE_START)
        if long_mode:
            assert pml4 is not None
            state = long_mode_state(rip, gdt, pml4, stack=layout.BOOT_STACK_POINTER, rsi=layout.ZERO_PAGE_START)
        else:
            # boot.rst 32-bit protocol: ESI = boot_params; EBP, EDI and EBX zero.
            state = protected_mode_flat_state(rip, gdt, stack=layout.BOOT_STACK_POINTER, rsi=layout.ZERO_PAGE_START)
    log.info("Linux %s: %s entry at %#x, command line %r", loaded.source, protocol, rip, full_cmdline)
    return BootImage(state, protocol, plan.placements, full_cmdline, loaded.source)


def _elf_entry(image: ElfImage, entry: LinuxEntry, name: str) -> tuple[int, str]:
    if entry == "pvh":
        pvh = pvh_entry_point(image)
        if pvh is None:
            raise BootError(
                f"{name} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                "build it with CONFIG_PVH or use the 64-bit entry"
            )
        return pvh, "pvh"
    return image.physical_entry(), "linux-64"
