import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hypervisor.boot.acpi import (
    ACPI_TABLES_START,
    FADT_SIZE,
    HEADER_SIZE,
    RSDP_SIZE,
    aml_name_seg,
    aml_pkg_length,
    build_acpi_tables,
    build_dsdt,
    build_madt,
    io_port_descriptor,
    write_acpi_tables,
)
from hypervisor.devices import pm
from hypervisor.devices.pvpanic import PVPANIC_PORT
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

TABLES = ("FACP", "APIC", "DSDT", "RSDT", "XSDT")


def table_at(blob: bytes, offset: int) -> bytes:
    (length,) = struct.unpack_from("<I", blob, offset + 4)
    return blob[offset : offset + length]


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_every_table_sums_to_zero_and_has_its_length(cpus: int) -> None:
    tables = build_acpi_tables(cpus)
    rsdp = tables.blob[:RSDP_SIZE]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert struct.unpack_from("<I", rsdp, 20)[0] == RSDP_SIZE
    for name in TABLES:
        table = table_at(tables.blob, tables.addresses[name] - tables.base)
        assert table[:4] == name.encode()
        assert sum(table) % 256 == 0, name
        assert len(table) >= HEADER_SIZE
    facs = tables.blob[tables.addresses["FACS"] - tables.base :][:64]
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert tables.addresses["FACS"] % 64 == 0 and tables.rsdp_address % 16 == 0
    assert ACPI_TABLES_START <= tables.rsdp_address < 0x100000


def test_rsdp_and_fadt_point_where_the_tables_are() -> None:
    tables = build_acpi_tables(2)
    blob, base, at = tables.blob, tables.base, tables.addresses
    rsdt_address, xsdt_address = struct.unpack_from("<I", blob, 16)[0], struct.unpack_from("<Q", blob, 24)[0]
    assert (rsdt_address, xsdt_address) == (at["RSDT"], at["XSDT"])
    rsdt = table_at(blob, at["RSDT"] - base)
    assert list(struct.unpack_from("<II", rsdt, HEADER_SIZE)) == [at["FACP"], at["APIC"]]
    xsdt = table_at(blob, at["XSDT"] - base)
    assert list(struct.unpack_from("<QQ", xsdt, HEADER_SIZE)) == [at["FACP"], at["APIC"]]
    fadt = table_at(blob, at["FACP"] - base)
    assert len(fadt) == FADT_SIZE
    firmware_ctrl, dsdt = struct.unpack_from("<II", fadt, 36)
    assert (firmware_ctrl, dsdt) == (at["FACS"], at["DSDT"])
    assert struct.unpack_from("<III", fadt, 56)[0] == pm.PM1A_EVENT_PORT
    assert struct.unpack_from("<I", fadt, 64)[0] == pm.PM1A_CONTROL_PORT
    assert struct.unpack_from("<I", fadt, 76)[0] == pm.PM_TIMER_PORT  # what vmexit_inl_pmtimer reads
    assert fadt[91] == 4  # PM_TMR_LEN
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 8) and flags & (1 << 10)  # TMR_VAL_EXT, RESET_REG_SUP
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, pm.RESET_PORT)
    assert fadt[128] == pm.RESET_VALUE
    assert struct.unpack_from("<QQ", fadt, 132) == (at["FACS"], at["DSDT"])


def test_madt_lists_each_cpu_the_ioapic_and_the_sci_override() -> None:
    madt = build_madt(3)
    offset, entries = HEADER_SIZE + 8, []
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    apics = [entry for kind, entry in entries if kind == 0]
    assert [(entry[2], entry[3]) for entry in apics] == [(0, 0), (1, 1), (2, 2)]
    ioapic = next(entry for kind, entry in entries if kind == 1)
    assert ioapic[2] == 3 and struct.unpack_from("<II", ioapic, 4) == (0xFEC00000, 0)
    overrides = [struct.unpack_from("<BBIH", entry, 2) for kind, entry in entries if kind == 2]
    assert overrides == [(0, 9, 9, 0x0D)]  # SCI level/active high; IRQ0 stays on pin 0 (KVM routing)


S5_PACKAGE = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x06, 0x04, 0, 0, 0, 0])


def test_dsdt_names_the_s5_sleep_type() -> None:
    assert build_dsdt()[HEADER_SIZE:].startswith(S5_PACKAGE)
    assert build_dsdt(pvpanic_port=None)[HEADER_SIZE:] == S5_PACKAGE


def test_dsdt_describes_the_pvpanic_port() -> None:
    aml = build_dsdt()[HEADER_SIZE:]
    device = aml[len(S5_PACKAGE) :]
    # Scope (\_SB) { Device (PEVT) { ... } }: ScopeOp, a one-byte PkgLength covering the rest.
    assert device[0] == 0x10 and device[1] == len(device) - 1 and device[2:7] == b"\\_SB_"
    assert device[7:9] == bytes([0x5B, 0x82]) and device[10:14] == b"PEVT"
    assert bytes([0x08]) + b"_HID" + bytes([0x0D]) + b"QEMU0001\0" in device
    # IO (Decode16, 0x505, 0x505, 1, 1), then the end tag (ACPI 6.5 §6.4.2.5, §6.4.2.9).
    assert bytes.fromhex("4701 0505 0505 01 01 7900") in device
    assert bytes.fromhex("14 09") + b"_STA" + bytes.fromhex("00 a4 0a 0b") in device  # Return (0x0B)
    other = build_dsdt(pvpanic_port=0x1234)[HEADER_SIZE:]
    assert bytes.fromhex("4701 3412 3412 01 01") in other


@pytest.mark.parametrize("port,length", [(-1, 1), (0x10000, 1), (0xFFFF, 2), (0x505, 0), (0x505, 256)])
def test_io_descriptors_refuse_ranges_outside_port_space(port: int, length: int) -> None:
    with pytest.raises(ValueError):
        io_port_descriptor(port, length)


@pytest.mark.parametrize("name", [b"_SB", b"1ABC", b"ab__", b"PE-T", b"_SB__"])
def test_name_segs_are_checked(name: bytes) -> None:
    with pytest.raises(ValueError):
        aml_name_seg(name)


@pytest.mark.parametrize("length,encoded", [(5, b"\x06"), (0x3E, b"\x3f"), (0x3F, b"\x41\x04"),
                                            (0xFFD, b"\x4f\xff"), (0x1000, b"\x83\x00\x01")])  # fmt: skip
def test_pkg_length_encoding(length: int, encoded: bytes) -> None:
    assert aml_pkg_length(length) == encoded


def test_too_many_cpus_and_memory_without_the_bios_area() -> None:
    with pytest.raises(BootError):
        build_madt(255)
    memory = GuestMemory([(0, 0x80000)])
    try:
        with pytest.raises(BootError):
            write_acpi_tables(memory, 1)
    finally:
        memory.close()


def test_iasl_disassembles_the_tables(tmp_path: Path) -> None:
    if shutil.which("iasl") is None:
        pytest.skip("iasl is not installed (Debian package acpica-tools)")
    tables = build_acpi_tables(2)
    for name in (*TABLES, "FACS"):
        path = tmp_path / f"{name.lower()}.dat"
        path.write_bytes(table_at(tables.blob, tables.addresses[name] - tables.base))
        done = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        listing = path.with_suffix(".dsl").read_text()
        for problem in ("Error", "Invalid", "Incorrect checksum", "Warning"):
            assert problem not in output and problem not in listing, output + listing


def test_iasl_finds_the_pvpanic_device_and_compiles_it_back(tmp_path: Path) -> None:
    """The DSDT as an OS's AML interpreter reads it: iasl disassembles it to the ASL of QEMU's
    pvpanic device, and compiles that back, unoptimised (-oa), to the very same AML."""
    if shutil.which("iasl") is None:
        pytest.skip("iasl is not installed (Debian package acpica-tools)")
    dsdt = build_dsdt()
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    done = subprocess.run(["iasl", "-d", "dsdt.dat"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    listing = (tmp_path / "dsdt.dsl").read_text()
    compact = " ".join(listing.split())
    assert "Scope (\\_SB) { Device (PEVT) {" in compact, listing
    assert 'Name (_HID, "QEMU0001")' in listing
    assert f"IO (Decode16, {PVPANIC_PORT:#06x}, // Range Minimum {PVPANIC_PORT:#06x}, // Range Maximum" in compact
    assert "0x01, // Alignment 0x01, // Length" in compact
    assert "Return (0x0B)" in listing
    again = subprocess.run(["iasl", "-oa", "-p", "again", "dsdt.dsl"], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0 and "0 Errors, 0 Warnings, 0 Remarks" in again.stdout, again.stdout + again.stderr
    assert (tmp_path / "again.aml").read_bytes()[HEADER_SIZE:] == dsdt[HEADER_SIZE:]
