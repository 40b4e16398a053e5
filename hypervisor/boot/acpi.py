"""ACPI tables: pure functions that build their bytes, checksums included (ACPI 6.5 §5.2).

What a PC firmware leaves for the OS (as QEMU's and Firecracker's do): the RSDP (§5.2.5) in the
BIOS read-only area 0xE0000-0xFFFFF on a 16-byte boundary, where an OS without EFI scans for it
(§5.2.5.1); the RSDT (§5.2.7) and XSDT (§5.2.8) listing the FADT (§5.2.9) and MADT (§5.2.12);
the FADT pointing at the FACS (§5.2.10), the DSDT (§5.2.11.1) and the fixed hardware of
hypervisor/devices/pm.py (PM1a event and control blocks, a 32-bit PM timer, the reset register).

The MADT describes one local APIC per vCPU (APIC id = vCPU index), the in-kernel IOAPIC (id =
number of CPUs, GSI base 0, as the MP table says) and the interrupt source overrides that match
the routing pyhv leaves in KVM: KVM's default GSI routing connects ISA IRQ n to IOAPIC pin n,
IRQ 0 (the PIT) included, so there is no IRQ 0 -> GSI 2 override (QEMU gives one because it
installs its own routing with KVM_SET_GSI_ROUTING); the SCI (IRQ 9) is declared level-triggered
and active-high, as QEMU declares it. The DSDT holds the \\_S5 package (§7.4.2.5), so an OS
knows which SLP_TYP value powers the machine off, and the pvpanic device (\\_SB.PEVT, `_HID`
"QEMU0001", its I/O port in `_CRS`; hypervisor/devices/pvpanic.py), which Linux's pvpanic
driver binds to by that ACPI id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisor.boot.layout import IOAPIC_ADDRESS, LAPIC_ADDRESS
from hypervisor.devices import pm
from hypervisor.devices.pvpanic import PVPANIC_PORT, PVPANIC_PORT_SIZE
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

ACPI_TABLES_START = 0xE0000  # §5.2.5.1: the RSDP lies in 0xE0000-0xFFFFF, on a 16-byte boundary
ACPI_TABLES_END = 0x100000
OEM_ID = b"PYHV  "  # 6 bytes
OEM_TABLE_ID = b"PYHVKVM "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYHV"
CREATOR_REVISION = 1
HEADER_FORMAT = "<4sIBB6s8sI4sI"  # §5.2.6 table 5.4: the system description table header
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 36
CHECKSUM_OFFSET = 9
SCI_IRQ = 9  # the SCI's ISA IRQ, as QEMU's PIIX4 uses
CMOS_CENTURY_INDEX = 0x32  # hypervisor/devices/cmos.py CENTURY
MAX_CPUS = 254  # 8-bit APIC ids, and the IOAPIC takes id = cpus

# RSDP (§5.2.5.3 table 5.3): signature, checksum over the first 20 bytes, OEM id, revision 2
# (ACPI 2.0+ with an XSDT), RSDT address, length, XSDT address, extended checksum, reserved.
RSDP_FORMAT = "<8sB6sBIIQB3s"
RSDP_SIZE = struct.calcsize(RSDP_FORMAT)  # 36
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2

# FADT (§5.2.9 table 5.9), revision 6, minor version 5 (ACPI 6.5): 276 bytes.
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
GAS_FORMAT = "<BBBBQ"  # §5.2.3.2 generic address structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 1, 2, 3
# FADT fixed feature flags (table 5.10).
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8  # the PM timer is 32 bits wide
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags (table 5.11): ISA devices not in the namespace (COM1, RTC), an
# 8042, no VGA.
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
C2_NOT_SUPPORTED_LATENCY = 101  # P_LVL2_LAT > 100: no C2 (table 5.9)
C3_NOT_SUPPORTED_LATENCY = 1001  # P_LVL3_LAT > 1000: no C3
HYPERVISOR_VENDOR = b"PYHV\0\0\0\0"  # FADT "Hypervisor Vendor Identity" (ACPI 6.0)

# FACS (§5.2.10 table 5.14): 64 bytes, 64-byte aligned, version 2, no checksum.
FACS_FORMAT = "<4sIIIIIQB3sI24s"
FACS_SIZE = struct.calcsize(FACS_FORMAT)
FACS_ALIGNMENT = 64
FACS_VERSION = 2
FACS_WAKING_VECTOR_OFFSET = 12  # Firmware Waking Vector: the real-mode resume address (§5.2.10)
FACS_X_WAKING_VECTOR_OFFSET = 24  # X_Firmware_Waking_Vector: 0 unless the OS resumes in 32/64-bit

# MADT (§5.2.12 tables 5.19-5.30).
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # dual 8259s present (the in-kernel PIC)
MADT_LOCAL_APIC, MADT_IOAPIC, MADT_INTERRUPT_OVERRIDE, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
LOCAL_APIC_ENABLED = 1 << 0
MPS_INTI_ACTIVE_HIGH = 0b01  # table 5.26 polarity
MPS_INTI_LEVEL_TRIGGERED = 0b11 << 2  # table 5.26 trigger mode
MPS_INTI_EDGE_TRIGGERED = 0b01 << 2
ALL_PROCESSORS = 0xFF
LINT1 = 1

# AML (§20.2) for the DSDT.
AML_ZERO_OP = 0x00
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_STRING_PREFIX = 0x0D
AML_SCOPE_OP = 0x10
AML_BUFFER_OP = 0x11
AML_PACKAGE_OP = 0x12
AML_METHOD_OP = 0x14
AML_RETURN_OP = 0xA4
AML_EXT_OP_PREFIX = 0x5B
AML_DEVICE_OP = 0x82  # after AML_EXT_OP_PREFIX
AML_ROOT_CHAR = 0x5C  # "\\"
DSDT_REVISION = 2  # 64-bit integers in AML
# Resource descriptors in a _CRS buffer (§6.4.2 small resource data types).
IO_PORT_DESCRIPTOR = 0x47  # §6.4.2.5: small item 0x08, 7 bytes of data
IO_DECODE_16 = 0x01  # §6.4.2.5 byte 1 bit 0: the device decodes all 16 address bits
END_TAG = 0x79  # §6.4.2.9: small item 0x0F, 1 byte of data (a checksum; 0: none)
# _STA (§6.3.7): present, enabled, functioning; not shown in the UI (bit 2), as QEMU's pvpanic
# says. Linux before 5.12 (drivers/misc/pvpanic.c, an ACPI driver) refused the device unless
# _STA returned these bits; later kernels take the ACPI default (present) without one.
PVPANIC_STA = 0x0B
PVPANIC_HID = "QEMU0001"  # QEMU docs/specs/pvpanic.rst "ACPI Interface"


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to zero modulo 256 (§5.2.5.3, §5.2.6)."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """`body` behind a system description header (§5.2.6) with length and checksum filled in."""
    header = struct.pack(HEADER_FORMAT, signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)  # fmt: skip
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def _gas(address: int, width_bits: int, access: int) -> bytes:
    return struct.pack(GAS_FORMAT, GAS_SYSTEM_IO, width_bits, 0, access, address)


def build_rsdp(rsdt_address: int, xsdt_address: int) -> bytes:
    rsdp = bytearray(struct.pack(RSDP_FORMAT, RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, rsdt_address, RSDP_SIZE,
                                 xsdt_address, 0, bytes(3)))  # fmt: skip
    rsdp[8] = checksum(rsdp[:20])  # the ACPI 1.0 checksum covers the first 20 bytes
    rsdp[32] = checksum(rsdp)  # the extended checksum covers all of it
    return bytes(rsdp)


def build_rsdt(addresses: list[int]) -> bytes:
    return _table(b"RSDT", 1, b"".join(struct.pack("<I", address) for address in addresses))


def build_xsdt(addresses: list[int]) -> bytes:
    return _table(b"XSDT", 1, b"".join(struct.pack("<Q", address) for address in addresses))


def build_facs() -> bytes:
    return struct.pack(FACS_FORMAT, b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, bytes(3), 0, bytes(24))


def aml_pkg_length(length: int) -> bytes:
    """A PkgLength (§20.2.4) for `length` bytes of content, the PkgLength's own bytes counted."""
    for size in range(1, 5):
        total = length + size
        if size == 1 and total < 0x40:
            return bytes([total])
        if size > 1 and total < 1 << (4 + 8 * (size - 1)):
            lead = ((size - 1) << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(size - 1, "little")
    raise ValueError(f"AML package of {length} bytes is too long")


def aml_integer(value: int) -> bytes:
    if value == 0:
        return bytes([AML_ZERO_OP])
    if value < 0x100:
        return bytes([AML_BYTE_PREFIX, value])
    raise ValueError("only byte constants are needed here")


def aml_name_seg(name: bytes) -> bytes:
    """A NameSeg (§20.2.2): a lead character A-Z or _, then three of A-Z, 0-9 or _."""
    if len(name) != 4:
        raise ValueError("an AML NameSeg has 4 characters")
    lead, rest = name[:1], name[1:]
    if not (lead.isupper() or lead == b"_") or not all(chr(c).isupper() or chr(c).isdigit() or c == 0x5F for c in rest):
        raise ValueError(f"{name!r} is not an AML NameSeg")
    return name


def aml_name_package(name: bytes, values: list[int]) -> bytes:
    """Name (NAME, Package () {values...}) with a 4-character NameSeg (§20.2.2, §20.2.5.4)."""
    contents = bytes([len(values)]) + b"".join(aml_integer(value) for value in values)
    return aml_name(name, bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(contents)) + contents)


def aml_name(name: bytes, data: bytes) -> bytes:
    """Name (NAME, data): DefName := NameOp NameString DataRefObject (§20.2.5.1)."""
    return bytes([AML_NAME_OP]) + aml_name_seg(name) + data


def aml_string(text: str) -> bytes:
    """A String constant (§20.2.3): StringPrefix, ASCII characters 0x01-0x7F, NullChar."""
    data = text.encode("ascii")
    if 0 in data:
        raise ValueError("an AML string cannot hold a NUL")
    return bytes([AML_STRING_PREFIX]) + data + b"\0"


def aml_buffer(data: bytes) -> bytes:
    """Buffer (len) {data}: DefBuffer := BufferOp PkgLength BufferSize ByteList (§20.2.5.4)."""
    contents = aml_integer(len(data)) + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(contents)) + contents


def aml_method(name: bytes, body: bytes, arguments: int = 0) -> bytes:
    """Method (NAME, arguments, NotSerialized) {body} (§20.2.5.2 DefMethod; flags bits 0-2: the
    argument count, bit 3 clear: not serialized, bits 4-7 zero: sync level 0)."""
    if not 0 <= arguments <= 7:
        raise ValueError("an AML method takes 0 to 7 arguments")
    contents = aml_name_seg(name) + bytes([arguments]) + body
    return bytes([AML_METHOD_OP]) + aml_pkg_length(len(contents)) + contents


def aml_return(value: int) -> bytes:
    return bytes([AML_RETURN_OP]) + aml_integer(value)


def aml_device(name: bytes, body: bytes) -> bytes:
    """Device (NAME) {body}: DefDevice := ExtOpPrefix DeviceOp PkgLength NameString TermList
    (§20.2.5.2)."""
    contents = aml_name_seg(name) + body
    return bytes([AML_EXT_OP_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(contents)) + contents


def aml_root_scope(name: bytes, body: bytes) -> bytes:
    """Scope (\\NAME) {body}: DefScope := ScopeOp PkgLength NameString TermList (§20.2.5.1), the
    NameString a RootChar and one NameSeg (§20.2.2)."""
    contents = bytes([AML_ROOT_CHAR]) + aml_name_seg(name) + body
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(contents)) + contents


def io_port_descriptor(port: int, length: int) -> bytes:
    """IO (Decode16, port, port, 1, length): one fixed range (§6.4.2.5 table 6.43: minimum and
    maximum base equal, alignment 1)."""
    if not 0 <= port <= 0xFFFF or not 1 <= length <= 0xFF or port + length > 0x10000:
        raise ValueError(f"an I/O port descriptor cannot describe {length} ports at {port:#x}")
    return struct.pack("<BBHHBB", IO_PORT_DESCRIPTOR, IO_DECODE_16, port, port, 1, length)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a buffer of resource descriptors closed by an end tag
    (§6.4.2.9), its checksum 0 (§6.4.2.9: "treated as if the checksum operation succeeded")."""
    return aml_buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def pvpanic_device(port: int = PVPANIC_PORT) -> bytes:
    """Device (PEVT) in \\_SB: the pvpanic ISA port, as QEMU describes it to its guests."""
    body = aml_name(b"_HID", aml_string(PVPANIC_HID))
    body += aml_name(b"_CRS", resource_template(io_port_descriptor(port, PVPANIC_PORT_SIZE)))
    body += aml_method(b"_STA", aml_return(PVPANIC_STA))
    return aml_root_scope(b"_SB_", aml_device(b"PEVT", body))


def build_dsdt(pvpanic_port: int | None = PVPANIC_PORT) -> bytes:
    """The DSDT's AML: \\_S5, and the pvpanic device unless `pvpanic_port` is None."""
    # \_S5: SLP_TYPa, SLP_TYPb and two reserved values (§7.4.2.5 "System \_Sx states").
    s5 = pm.S5_SLEEP_TYPE
    aml = aml_name_package(b"_S5_", [s5, s5, 0, 0])
    if pvpanic_port is not None:
        aml += pvpanic_device(pvpanic_port)
    return _table(b"DSDT", DSDT_REVISION, aml)


def build_fadt(facs_address: int, dsdt_address: int) -> bytes:
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP
    boot_arch = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT
    body = bytearray()
    body += struct.pack("<IIBBHIBBBB", facs_address, dsdt_address, 0, 0, SCI_IRQ, 0, 0, 0, 0, 0)
    body += struct.pack("<IIIIIIII", pm.PM1A_EVENT_PORT, 0, pm.PM1A_CONTROL_PORT, 0, 0, pm.PM_TIMER_PORT, 0, 0)
    body += struct.pack("<BBBBBBBB", pm.PM1_EVENT_LENGTH, pm.PM1_CONTROL_LENGTH, 0, pm.PM_TIMER_LENGTH, 0, 0, 0, 0)
    body += struct.pack("<HHHHBBBBBHBI", C2_NOT_SUPPORTED_LATENCY, C3_NOT_SUPPORTED_LATENCY, 0, 0, 0, 0, 0, 0,
                        CMOS_CENTURY_INDEX, boot_arch, 0, flags)  # fmt: skip
    body += _gas(pm.RESET_PORT, 8, GAS_ACCESS_BYTE)
    body += struct.pack("<BHB", pm.RESET_VALUE, 0, FADT_MINOR_REVISION)
    body += struct.pack("<QQ", facs_address, dsdt_address)
    body += _gas(pm.PM1A_EVENT_PORT, 8 * pm.PM1_EVENT_LENGTH, GAS_ACCESS_WORD)  # X_PM1a_EVT_BLK
    body += _gas(0, 0, 0)  # X_PM1b_EVT_BLK
    body += _gas(pm.PM1A_CONTROL_PORT, 8 * pm.PM1_CONTROL_LENGTH, GAS_ACCESS_WORD)  # X_PM1a_CNT_BLK
    body += _gas(0, 0, 0) + _gas(0, 0, 0)  # X_PM1b_CNT_BLK, X_PM2_CNT_BLK
    body += _gas(pm.PM_TIMER_PORT, 8 * pm.PM_TIMER_LENGTH, GAS_ACCESS_DWORD)  # X_PM_TMR_BLK
    body += _gas(0, 0, 0) * 4  # X_GPE0_BLK, X_GPE1_BLK, SLEEP_CONTROL_REG, SLEEP_STATUS_REG
    body += HYPERVISOR_VENDOR
    table = _table(b"FACP", FADT_REVISION, bytes(body))
    assert len(table) == FADT_SIZE, len(table)
    return table


def build_madt(cpus: int) -> bytes:
    if not 1 <= cpus <= MAX_CPUS:
        raise BootError(f"the MADT supports 1 to {MAX_CPUS} CPUs, not {cpus}")
    entries = [struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED) for cpu in range(cpus)]
    entries.append(struct.pack("<BBBBII", MADT_IOAPIC, 12, cpus, 0, IOAPIC_ADDRESS, 0))
    entries.append(struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ,
                               MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL_TRIGGERED))  # fmt: skip
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, LINT1))
    body = struct.pack("<II", LAPIC_ADDRESS, MADT_PCAT_COMPAT) + b"".join(entries)
    return _table(b"APIC", MADT_REVISION, body)


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out from `base`: one blob to copy there, and where each one starts."""

    base: int
    blob: bytes
    addresses: dict[str, int]

    @property
    def rsdp_address(self) -> int:
        return self.addresses["RSDP"]


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def facs_address(base: int = ACPI_TABLES_START) -> int:
    """Where build_acpi_tables puts the FACS: first after the RSDP, 64-byte aligned."""
    return _align(base + RSDP_SIZE, FACS_ALIGNMENT)


def build_acpi_tables(cpus: int, base: int = ACPI_TABLES_START, pvpanic_port: int | None = PVPANIC_PORT) -> AcpiTables:
    """RSDP first (at `base`, which must be 16-byte aligned), then FACS, DSDT, FADT, MADT, RSDT
    and XSDT, each 16-byte aligned (the FACS 64-byte aligned, §5.2.10). The DSDT describes the
    pvpanic port at `pvpanic_port` (None: no pvpanic device)."""
    if base % 16:
        raise BootError(f"the RSDP must be 16-byte aligned, not at {base:#x}")
    addresses: dict[str, int] = {"RSDP": base}
    cursor = base + RSDP_SIZE
    tables: dict[str, bytes] = {}

    def put(name: str, data: bytes, alignment: int = 16) -> int:
        nonlocal cursor
        cursor = _align(cursor, alignment)
        addresses[name] = cursor
        tables[name] = data
        cursor += len(data)
        return addresses[name]

    facs = put("FACS", build_facs(), FACS_ALIGNMENT)
    dsdt = put("DSDT", build_dsdt(pvpanic_port))
    fadt = put("FACP", build_fadt(facs, dsdt))
    madt = put("APIC", build_madt(cpus))
    rsdt = put("RSDT", build_rsdt([fadt, madt]))
    xsdt = put("XSDT", build_xsdt([fadt, madt]))
    blob = bytearray(cursor - base)
    blob[:RSDP_SIZE] = build_rsdp(rsdt, xsdt)
    for name, data in tables.items():
        offset = addresses[name] - base
        blob[offset : offset + len(data)] = data
    return AcpiTables(base, bytes(blob), addresses)


def write_acpi_tables(memory: GuestMemory, cpus: int, base: int = ACPI_TABLES_START,
                      pvpanic_port: int | None = PVPANIC_PORT) -> AcpiTables:  # fmt: skip
    tables = build_acpi_tables(cpus, base, pvpanic_port)
    if base + len(tables.blob) > ACPI_TABLES_END or not memory.contains(base, len(tables.blob)):
        raise BootError(f"the ACPI tables for {cpus} CPUs do not fit in guest RAM at {base:#x}")
    memory.write(base, tables.blob)
    return tables
