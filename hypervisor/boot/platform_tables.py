"""What firmware would leave in low memory for any protected- or long-mode entry.

The boot GDT (boot.rst: __BOOT_CS 0x10, __BOOT_DS 0x18), the identity page tables for the
64-bit entry, the Intel MP table in the EBDA, the BIOS data area's pointer to the EBDA
(Intel MP spec 1.4 §4: one of the places an OS searches for the MP floating pointer), and the
ACPI tables with their RSDP at 0xE0000 in the BIOS area (ACPI 6.5 §5.2.5.1), which the e820 map
keeps reserved. The DSDT describes the pvpanic port (0x505) that every machine has
(hypervisor/devices/pvpanic.py), so a kernel with ACPI and CONFIG_PVPANIC reports its panics there.
"""

from __future__ import annotations

from hypervisor.boot import layout
from hypervisor.boot.acpi import ACPI_TABLES_START, write_acpi_tables
from hypervisor.boot.cpu_state import GDT_ENTRY_COUNT, DescriptorTable, setup_gdt
from hypervisor.boot.mptable import write_mptable
from hypervisor.boot.page_tables import identity_page_tables_size, setup_identity_page_tables
from hypervisor.boot.placement import MemoryPlan
from hypervisor.devices.pvpanic import PVPANIC_PORT
from hypervisor.memory import GuestMemory

BOOT_GDT_SIZE = GDT_ENTRY_COUNT * 8


def write_platform_tables(memory: GuestMemory, plan: MemoryPlan, cpus: int,
                          long_mode: bool) -> tuple[DescriptorTable, int | None]:
    """GDT, identity page tables (long mode only), MP table, the BDA's EBDA pointer and ACPI.

    Returns the GDTR value and the PML4 address (None without paging).
    """
    plan.place("boot GDT", layout.BOOT_GDT_START, BOOT_GDT_SIZE)
    gdt = setup_gdt(memory, layout.BOOT_GDT_START, long_mode=long_mode)
    pml4: int | None = None
    if long_mode:
        plan.place("page tables", layout.PML4_START, identity_page_tables_size())
        pml4 = setup_identity_page_tables(memory, layout.PML4_START)
    mptable_size = write_mptable(memory, layout.MPTABLE_START, cpus)
    plan.place("MP table", layout.MPTABLE_START, mptable_size)
    # BIOS data area word 0x40e: the EBDA's segment, where Linux also looks for the MP table.
    memory.write_u16(layout.BDA_EBDA_SEGMENT, layout.EBDA_START >> 4)
    acpi = write_acpi_tables(memory, cpus, ACPI_TABLES_START, PVPANIC_PORT)
    plan.place("ACPI tables", acpi.base, len(acpi.blob))
    return gdt, pml4
