"""The guest physical memory map: where RAM, boot structures and MMIO windows go.

Low memory follows Firecracker's arch/x86_64/layout.rs (a layout Linux is known to accept):

    0x0000_0400  BIOS data area (BDA); 0x40e holds the EBDA segment (for MP table scans)
    0x0000_0500  boot GDT (5 descriptors, 40 bytes); the boot IDT is empty (limit 0)
    0x0000_6000  PVH hvm_start_info or multiboot info, then its module list and memory map
    0x0000_7000  zero page (struct boot_params, 4 KiB)
    0x0000_8ff0  initial stack pointer (grows down, below the page tables)
    0x0000_9000  identity page tables: PML4, PDPT, 4 page directories (to 0xf000)
    0x0002_0000  kernel command line (up to 64 KiB)
    0x0009_fc00  EBDA: MP floating pointer and MP configuration table (Intel MP spec 1.4 §4)
    0x000a_0000  legacy VGA/BIOS area, reserved in e820 (backed by RAM, never used)
    0x0010_0000  kernel (boot.rst: the protected-mode kernel is loaded at 1 MiB)

RAM above 1 MiB runs up to the 32-bit MMIO hole at 3 GiB; what does not fit below it continues at
4 GiB. Inside the hole: virtio-mmio windows from 0xd000_0000 (4 KiB each), the IOAPIC at
0xfec0_0000 and the local APIC at 0xfee0_0000 (Intel MP spec 1.4 §3.6.2 default addresses).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- low-memory boot structures (Firecracker arch/x86_64/layout.rs) ---
BDA_EBDA_SEGMENT = 0x40E  # BIOS data area word holding the EBDA segment (Intel MP spec §4)
BOOT_GDT_START = 0x500
BOOT_GDT_END = 0x528  # cpu_state.GDT_ENTRY_COUNT descriptors of 8 bytes
BOOT_INFO_START = 0x6000  # hvm_start_info (PVH) or multiboot_info, then their tables
BOOT_INFO_END = 0x7000
ZERO_PAGE_START = 0x7000
ZERO_PAGE_SIZE = 0x1000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PAGE_TABLES_END = 0xF000  # PML4 + PDPT + 4 page directories for a 4 GiB identity map
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0x9FC00  # 639 KiB: the last KiB of conventional memory
MPTABLE_START = EBDA_START
BIOS_AREA_END = 0x100000  # EBDA, VGA memory and BIOS ROM end at 1 MiB
HIMEM_START = 0x100000  # boot.rst: protected-mode kernel load address

# --- the 32-bit MMIO hole and what lives in it ---
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_WINDOW_SIZE = 0x1000  # virtio 1.2 §4.2.2: registers fit in 0x100 + config space
IOAPIC_ADDRESS = 0xFEC0_0000  # Intel MP spec 1.4 §3.6.2
LAPIC_ADDRESS = 0xFEE0_0000  # Intel SDM vol. 3A §10.4.1 (IA32_APIC_BASE default)
# GSIs for virtio-mmio devices: above the legacy ISA devices of the PC (COM1 uses IRQ 4), up to
# the last IOAPIC input pin (the in-kernel IOAPIC has 24 pins, KVM_IOAPIC_NUM_PINS).
VIRTIO_MMIO_FIRST_IRQ = 5
IOAPIC_PINS = 24
MAX_VIRTIO_MMIO_DEVICES = IOAPIC_PINS - VIRTIO_MMIO_FIRST_IRQ

# --- e820 types, ACPI 6.5 §15 table 15.1 (Linux arch/x86/include/uapi/asm/setup_data.h) ---
E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128  # boot_params.e820_table has 128 slots

MIN_RAM_SIZE = 2 * MiB  # the boot structures below 1 MiB plus at least 1 MiB above it


@dataclass(frozen=True)
class E820Entry:
    address: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True)
class MmioWindow:
    """One virtio-mmio device's register window and its interrupt line (GSI)."""

    gpa: int
    size: int
    irq: int

    def kernel_parameter(self) -> str:
        """Linux's virtio_mmio.device=<size>@<base>:<irq> (drivers/virtio/virtio_mmio.c)."""
        return f"virtio_mmio.device={self.size // KiB}K@{self.gpa:#x}:{self.irq}"


@dataclass(frozen=True)
class GuestLayout:
    """Where `ram_size` bytes of guest RAM live, and the e820 map that describes them."""

    ram_size: int
    memory_regions: tuple[tuple[int, int], ...]  # (gpa, size) for GuestMemory(...)
    e820: tuple[E820Entry, ...]

    @property
    def low_ram_end(self) -> int:
        """End of the RAM below the MMIO hole (where kernels, initrds and tables must fit)."""
        return self.memory_regions[0][0] + self.memory_regions[0][1]


def guest_layout(ram_size: int) -> GuestLayout:
    """The RAM regions and e820 map for a guest with `ram_size` bytes of RAM.

    RAM up to 3 GiB is one region at GPA 0; the rest goes to a second region at 4 GiB, so that
    the MMIO hole [3 GiB, 4 GiB) stays free for devices. The e820 map marks the EBDA, VGA and
    BIOS area [0x9fc00, 1 MiB) reserved although it is backed by the first region.
    """
    if ram_size < MIN_RAM_SIZE:
        raise ConfigError(f"guest RAM of {ram_size} bytes is too small (at least {MIN_RAM_SIZE // MiB} MiB)")
    if ram_size % (4 * KiB):
        raise ConfigError(f"guest RAM size {ram_size} is not a multiple of 4 KiB")
    low_size = min(ram_size, MMIO_HOLE_START)
    regions = [(0, low_size)]
    e820 = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, BIOS_AREA_END - EBDA_START, E820_RESERVED),
        E820Entry(HIMEM_START, low_size - HIMEM_START, E820_RAM),
    ]
    if ram_size > low_size:
        high_size = ram_size - low_size
        regions.append((MMIO_HOLE_END, high_size))
        e820.append(E820Entry(MMIO_HOLE_END, high_size, E820_RAM))
    return GuestLayout(ram_size, tuple(regions), tuple(e820))


def virtio_mmio_window(index: int) -> MmioWindow:
    """The window and GSI of the `index`th virtio-mmio device (0-based)."""
    if not 0 <= index < MAX_VIRTIO_MMIO_DEVICES:
        raise ConfigError(f"at most {MAX_VIRTIO_MMIO_DEVICES} virtio-mmio devices are supported")
    return MmioWindow(VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_WINDOW_SIZE, VIRTIO_MMIO_WINDOW_SIZE,
                      VIRTIO_MMIO_FIRST_IRQ + index)
