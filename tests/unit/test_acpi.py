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
    aml_pkg_length,
    build_acpi_tables,
    build_dsdt,
    build_madt,
    write_acpi_tables,
)
from hypervisor.devices import pm
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


def test_dsdt_names_the_s5_sleep_type() -> None:
    aml = build_dsdt()[HEADER_SIZE:]
    assert aml == bytes([0x08]) + b"_S5_" + bytes([0x12, 0x06, 0x04, 0, 0, 0, 0])


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
