"""The Intel MultiProcessor Specification 1.4 tables, telling the guest its CPUs and interrupts.

Without ACPI, Linux finds its CPUs and IOAPIC through the MP floating pointer, which it searches
in the last KiB of conventional memory (the EBDA, 0x9fc00), among other places (MP spec §4). We
write the floating pointer there (§4.1) followed by the configuration table (§4.2): one processor
entry per vCPU (local APIC id = vCPU index), an ISA bus, one IOAPIC (id = number of CPUs, at
0xfec00000), an I/O interrupt entry per IOAPIC pin (ISA IRQ n -> pin n, KVM's default GSI
routing), and the local interrupts LINT0 = ExtINT (the 8259 PIC, virtual wire mode) and
LINT1 = NMI (§5.1, the default configuration's wiring).
"""

from __future__ import annotations

import struct

from hypervisor.boot.layout import IOAPIC_ADDRESS, IOAPIC_PINS, LAPIC_ADDRESS
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

# §4.1 floating pointer structure: "_MP_", physical address pointer, length in 16-byte
# paragraphs, spec revision, checksum, feature bytes 1-5 (all zero: a configuration table
# follows, no IMCR, i.e. virtual wire mode).
FLOATING_POINTER_FORMAT = "<4sIBBB5s"
FLOATING_POINTER_SIGNATURE = b"_MP_"
SPEC_REVISION = 4  # MP spec 1.4
# §4.2 configuration table header: "PCMP", base table length, revision, checksum, OEM id,
# product id, OEM table pointer and size, entry count, local APIC address, extended table
# length and checksum, reserved.
HEADER_FORMAT = "<4sHBB8s12sIHHIHBB"
HEADER_SIGNATURE = b"PCMP"
OEM_ID = b"PYHV    "
PRODUCT_ID = b"PYHV KVM    "

# §4.3 entry types and formats.
ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
PROCESSOR_FORMAT = "<BBBBII8s"  # type, APIC id, APIC version, flags, signature, features
BUS_FORMAT = "<BB6s"  # type, bus id, bus type string
IOAPIC_FORMAT = "<BBBBI"  # type, id, version, flags, address
INTERRUPT_FORMAT = "<BBHBBBB"  # type, interrupt type, flags, bus, bus IRQ, dest id, dest pin
CPU_ENABLED = 0x01  # §4.3.1 CPU flags: EN
CPU_BOOTSTRAP = 0x02  # BP
IOAPIC_ENABLED = 0x01
LAPIC_VERSION = 0x14  # integrated APIC, as KVM's in-kernel LAPIC reports (APIC_VERSION)
IOAPIC_VERSION = 0x11  # KVM's in-kernel IOAPIC (IOAPIC_VERSION_ID in arch/x86/kvm/ioapic.h)
# §4.3.1: family 6 in the CPU signature; features FPU (bit 0) and APIC (bit 9) of CPUID.1:EDX.
CPU_SIGNATURE = 0x600
CPU_FEATURES = 0x201
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
# §4.3.4 interrupt types; flags 0 = "conforms to the bus" polarity and trigger.
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
ALL_LOCAL_APICS = 0xFF
MAX_CPUS = 254  # APIC ids are 8 bits and the IOAPIC takes id = cpus


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to zero modulo 256 (§4.1, §4.2)."""
    return -sum(data) & 0xFF


def build_mptable(gpa: int, cpus: int) -> bytes:
    """The floating pointer at `gpa` followed by the configuration table, checksums filled in."""
    if not 1 <= cpus <= MAX_CPUS:
        raise BootError(f"the MP table supports 1 to {MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = cpus
    entries = [
        struct.pack(PROCESSOR_FORMAT, ENTRY_PROCESSOR, cpu, LAPIC_VERSION,
                    CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0), CPU_SIGNATURE, CPU_FEATURES, bytes(8))
        for cpu in range(cpus)
    ]
    entries.append(struct.pack(BUS_FORMAT, ENTRY_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(struct.pack(IOAPIC_FORMAT, ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED,
                               IOAPIC_ADDRESS))
    entries.extend(
        struct.pack(INTERRUPT_FORMAT, ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, ISA_BUS_ID, irq, ioapic_id, irq)
        for irq in range(IOAPIC_PINS)
    )
    entries.append(struct.pack(INTERRUPT_FORMAT, ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0,
                               ALL_LOCAL_APICS, 0))
    entries.append(struct.pack(INTERRUPT_FORMAT, ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ISA_BUS_ID, 0,
                               ALL_LOCAL_APICS, 1))
    body = b"".join(entries)

    table_gpa = gpa + struct.calcsize(FLOATING_POINTER_FORMAT)
    table_length = struct.calcsize(HEADER_FORMAT) + len(body)
    header = bytearray(struct.pack(HEADER_FORMAT, HEADER_SIGNATURE, table_length, SPEC_REVISION, 0, OEM_ID,
                                   PRODUCT_ID, 0, 0, len(entries), LAPIC_ADDRESS, 0, 0, 0))
    header[7] = _checksum(header + body)  # checksum byte at offset 7 (§4.2 table 4-2)

    pointer = bytearray(struct.pack(FLOATING_POINTER_FORMAT, FLOATING_POINTER_SIGNATURE, table_gpa, 1,
                                    SPEC_REVISION, 0, bytes(5)))
    pointer[10] = _checksum(pointer)  # checksum byte at offset 10 (§4.1 table 4-1)
    return bytes(pointer + header + body)


def write_mptable(memory: GuestMemory, gpa: int, cpus: int) -> int:
    """Write the MP tables at `gpa`; returns their size in bytes."""
    table = build_mptable(gpa, cpus)
    if not memory.contains(gpa, len(table)):
        raise BootError(f"the MP table for {cpus} CPUs does not fit in guest RAM at {gpa:#x}")
    memory.write(gpa, table)
    return len(table)
