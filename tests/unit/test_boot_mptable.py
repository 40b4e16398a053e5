"""Intel MultiProcessor Specification 1.4 tables: structure, checksums, entries."""

from __future__ import annotations

import struct

import pytest

from hypervisor.boot.layout import IOAPIC_ADDRESS, LAPIC_ADDRESS, MPTABLE_START
from hypervisor.boot.mptable import build_mptable, write_mptable
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(table: bytes, gpa: int):
    assert table[:4] == b"_MP_"
    assert sum(table[:16]) % 256 == 0
    pointer, length, revision = struct.unpack_from("<IBB", table, 4)
    assert (length, revision) == (1, 4)
    header = table[pointer - gpa :]
    assert header[:4] == b"PCMP"
    base_length, _revision, _checksum = struct.unpack_from("<HBB", header, 4)
    assert sum(header[:base_length]) % 256 == 0
    count, lapic = struct.unpack_from("<HI", header, 34)
    assert lapic == LAPIC_ADDRESS
    entries, offset = [], 44
    for _ in range(count):
        kind = header[offset]
        entries.append(header[offset : offset + ENTRY_SIZES[kind]])
        offset += ENTRY_SIZES[kind]
    assert offset == base_length
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 8, 64])
def test_tables_have_valid_checksums_and_one_processor_per_cpu(cpus):
    entries = parse(build_mptable(MPTABLE_START, cpus), MPTABLE_START)
    processors = [e for e in entries if e[0] == 0]
    assert [p[1] for p in processors] == list(range(cpus))  # APIC ids
    assert [p[3] for p in processors] == [3] + [1] * (cpus - 1)  # enabled, CPU 0 is the BSP
    bus = [e for e in entries if e[0] == 1]
    assert [b[2:8] for b in bus] == [b"ISA   "]
    (ioapic,) = [e for e in entries if e[0] == 2]
    assert ioapic[1] == cpus and ioapic[3] & 1
    assert struct.unpack_from("<I", ioapic, 4)[0] == IOAPIC_ADDRESS
    io_interrupts = [e for e in entries if e[0] == 3]
    # (source bus IRQ, destination IOAPIC id, pin) for ISA IRQs 0-15 and the virtio-mmio lines.
    assert [(e[5], e[6], e[7]) for e in io_interrupts] == [(irq, cpus, irq) for irq in range(24)]
    local = [e for e in entries if e[0] == 4]
    assert [(e[1], e[6], e[7]) for e in local] == [(3, 0xFF, 0), (1, 0xFF, 1)]  # LINT0 ExtINT, LINT1 NMI


def test_write_places_it_in_guest_memory():
    memory = GuestMemory.flat(1 << 20)
    try:
        size = write_mptable(memory, MPTABLE_START, 4)
        parse(memory.read(MPTABLE_START, size), MPTABLE_START)
    finally:
        memory.close()


@pytest.mark.parametrize("cpus", [0, 255])
def test_cpu_count_limits(cpus):
    with pytest.raises(BootError):
        build_mptable(MPTABLE_START, cpus)
