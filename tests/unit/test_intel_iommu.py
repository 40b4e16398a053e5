"""The VT-d model (hypervisor/devices/intel_iommu.py) against tables built as a guest builds them,
and the interrupt routing of a PCI function through it (hypervisor/devices/pci_routing.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hypervisor.devices import intel_iommu as vtd
from hypervisor.devices.bus import Bus
from hypervisor.devices.pci_routing import RoutedPciInterrupts
from hypervisor.memory import GuestMemory

SOURCE = 0x0010  # 00:02.0
ROOT, CONTEXT, L3, L2, L1, IRT, QUEUE = (0x10000 + 0x1000 * n for n in range(7))


class Unit:
    def __init__(self) -> None:
        self.memory = GuestMemory.flat(4 << 20)
        self.events: list[tuple[int, int]] = []
        self.iommu = vtd.IntelIommu(self.memory, lambda address, data: self.events.append((address, data)))
        self.bus = Bus("mmio", 1 << 32)
        self.bus.insert(self.iommu, vtd.IOMMU_ADDRESS, vtd.REGISTERS_SIZE)

    def read(self, offset: int, size: int = 4) -> int:
        data = bytearray(size)
        assert self.bus.read(vtd.IOMMU_ADDRESS + offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int = 4) -> None:
        assert self.bus.write(vtd.IOMMU_ADDRESS + offset, value.to_bytes(size, "little"))

    def command(self, bit: int) -> None:
        """As lib/x86/intel-iommu.c vtd_gcmd_or: the status so far plus one command bit."""
        self.write(vtd.GCMD_REG, self.read(vtd.GSTS_REG) | bit)

    def map_device(self, translation_type: int = 0, fpd: bool = False, address_width: int = 1) -> None:
        self.memory.write_u64(ROOT + 16 * (SOURCE >> 8), CONTEXT | 1)
        low = L3 | translation_type << 2 | int(fpd) << 1 | 1
        self.memory.write_u64(CONTEXT + 16 * (SOURCE & 0xFF), low)
        self.memory.write_u64(CONTEXT + 16 * (SOURCE & 0xFF) + 8, address_width | SOURCE << 8)
        self.memory.write_u64(L3, L2 | 3)
        self.memory.write_u64(L2, L1 | 3)
        self.write(vtd.RTADDR_REG, ROOT, 8)
        self.command(vtd.GCMD_SRTP)
        self.command(vtd.GCMD_TE)

    def irte(self, index: int, vector: int, destination: int = 0, source: int = SOURCE, validation: int = 1,
             extra: int = 0) -> None:  # fmt: skip
        low = 1 | vector << 16 | destination << 40 | extra
        self.memory.write_u64(IRT + 16 * index, low)
        self.memory.write_u64(IRT + 16 * index + 8, source | validation << 18)

    def enable_remapping(self, size_field: int = 0xF) -> None:
        self.write(vtd.IRTA_REG, IRT | size_field, 8)
        self.command(vtd.GCMD_SIRTP)
        self.command(vtd.GCMD_IRE)


@pytest.fixture
def unit() -> Iterator[Unit]:
    made = Unit()
    yield made
    made.memory.close()


def test_registers_a_guest_reads_first(unit: Unit) -> None:
    assert unit.read(vtd.VER_REG) == 0x10
    cap = unit.read(vtd.CAP_REG, 8)
    assert cap & 0x200 and (cap >> 34) & 3 == 3 and (cap >> 16) & 0x3F == 38
    assert (cap >> 24) & 0x3FF == vtd.FRCD_OFFSET // 16
    ecap = unit.read(vtd.ECAP_REG, 8)
    assert ecap & 0b1010 == 0b1010 and not ecap & 1 << 4  # QI and IR, no EIM
    assert unit.read(vtd.FSTS_REG) == 0 and unit.read(vtd.GSTS_REG) == 0


def test_global_commands_set_status_as_the_kvm_unit_test_expects(unit: Unit) -> None:
    for bit in (vtd.GCMD_QIE, vtd.GCMD_SRTP, vtd.GCMD_SIRTP, vtd.GCMD_TE, vtd.GCMD_IRE):
        unit.command(bit)
        assert unit.read(vtd.GSTS_REG) & bit
    unit.write(vtd.GCMD_REG, unit.read(vtd.GSTS_REG) & ~vtd.GCMD_TE)
    status = unit.read(vtd.GSTS_REG)
    assert not status & vtd.GCMD_TE and status & vtd.GCMD_IRE and status & vtd.GCMD_SRTP


def test_dma_translates_through_three_levels(unit: Unit) -> None:
    unit.map_device()
    unit.memory.write_u64(L1 + 8 * 3, 0x200000 | 3)  # IOVA 0x3000 -> 0x200000
    unit.memory.write(0x200010, b"hello")
    assert unit.iommu.dma_read(SOURCE, 0x3010, 5) == b"hello"
    assert unit.iommu.dma_write(SOURCE, 0x3020, b"world")
    assert unit.memory.read(0x200020, 5) == b"world"
    assert unit.iommu.faults == 0


def test_a_large_page_maps_2_mib(unit: Unit) -> None:
    unit.map_device()
    unit.memory.write_u64(L2 + 8, 0x200000 | vtd.PTE_LARGE | 3)  # IOVA 2 MiB -> 2 MiB
    unit.memory.write(0x3FF000, b"edge")
    assert unit.iommu.dma_read(SOURCE, 0x3FF000, 4) == b"edge"


def test_pass_through_context_and_translation_off(unit: Unit) -> None:
    unit.memory.write(0x5000, b"raw")
    assert unit.iommu.dma_read(SOURCE, 0x5000, 3) == b"raw"  # TE clear: untranslated
    unit.map_device(translation_type=2)
    assert unit.iommu.dma_read(SOURCE, 0x5000, 3) == b"raw"


def test_a_write_to_a_read_only_page_faults_and_is_recorded(unit: Unit) -> None:
    unit.map_device()
    unit.memory.write_u64(L1, 0x200000 | vtd.PTE_READ)
    assert not unit.iommu.dma_write(SOURCE, 0x10, b"x")
    assert unit.memory.read(0x200010, 1) == b"\0"
    assert unit.read(vtd.FSTS_REG) & vtd.FSTS_PPF
    record = unit.read(vtd.FRCD_OFFSET + 8, 8)
    assert record >> 63 == 1 and (record >> 32) & 0xFF == vtd.FR_WRITE_DENIED and record & 0xFFFF == SOURCE
    assert (record >> 62) & 1 == 0  # a write
    assert unit.events == []  # fault events masked (FECTL.IM after reset)
    unit.write(vtd.FEDATA_REG, 0x31)
    unit.write(vtd.FEADDR_REG, 0xFEE0_0000)
    unit.write(vtd.FECTL_REG, 0)  # unmasked with one pending: sent now
    assert unit.events == [(0xFEE0_0000, 0x31)]
    assert not unit.iommu.dma_write(SOURCE, 0x10, b"x")  # the register is full: overflow
    assert unit.read(vtd.FSTS_REG) & vtd.FSTS_PFO
    unit.write(vtd.FRCD_OFFSET + 12, 1 << 31)
    assert not unit.read(vtd.FSTS_REG) & vtd.FSTS_PPF


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda u: u.memory.write_u64(ROOT, 0), vtd.FR_ROOT_NOT_PRESENT),
        (lambda u: u.memory.write_u64(CONTEXT + 16 * (SOURCE & 0xFF), 0), vtd.FR_CONTEXT_NOT_PRESENT),
        (lambda u: u.memory.write_u64(ROOT, CONTEXT | 1 | 0x10), vtd.FR_ROOT_RESERVED),
        (lambda u: u.memory.write_u64(L3, 0), vtd.FR_READ_DENIED),
        (lambda u: u.memory.write_u64(CONTEXT + 16 * (SOURCE & 0xFF) + 8, 2), vtd.FR_CONTEXT_INVALID),
        (lambda u: u.memory.write_u64(L3, 0x7FFF_F000 | 3), vtd.FR_TABLE_ACCESS),
    ],
)
def test_broken_tables_fault_with_their_reason(unit: Unit, setup: object, reason: int) -> None:
    unit.map_device()
    unit.memory.write_u64(L1, 0x200000 | 3)
    setup(unit)  # type: ignore[operator]
    assert unit.iommu.dma_read(SOURCE, 0, 4) is None
    assert (unit.read(vtd.FRCD_OFFSET + 8, 8) >> 32) & 0xFF == reason


def test_an_address_beyond_39_bits_faults(unit: Unit) -> None:
    unit.map_device()
    assert unit.iommu.dma_read(SOURCE, 1 << 39, 4) is None
    assert (unit.read(vtd.FRCD_OFFSET + 8, 8) >> 32) & 0xFF == vtd.FR_ADDRESS_BEYOND_AW


def test_fault_processing_disable_suppresses_the_record(unit: Unit) -> None:
    unit.map_device(fpd=True)
    assert unit.iommu.dma_read(SOURCE, 0, 4) is None  # L1 is empty
    assert unit.iommu.faults == 1 and unit.read(vtd.FSTS_REG) == 0


def test_a_request_spanning_a_fault_moves_nothing(unit: Unit) -> None:
    unit.map_device()
    unit.memory.write_u64(L1, 0x200000 | 3)  # page 0 mapped, page 1 not
    assert not unit.iommu.dma_write(SOURCE, 0xFF0, b"y" * 32)
    assert unit.memory.read(0x200FF0, 16) == bytes(16)


def test_register_invalidations_complete_at_once(unit: Unit) -> None:
    unit.write(vtd.CCMD_REG, 1 << 63 | 1 << 61, 8)  # global context invalidation
    ccmd = unit.read(vtd.CCMD_REG, 8)
    assert not ccmd >> 63 and (ccmd >> 59) & 3 == 1
    unit.write(vtd.IOTLB_OFFSET + 8, 1 << 63 | 1 << 60, 8)
    iotlb = unit.read(vtd.IOTLB_OFFSET + 8, 8)
    assert not iotlb >> 63 and (iotlb >> 57) & 3 == 1


def test_the_invalidation_queue_runs_a_wait_descriptor(unit: Unit) -> None:
    unit.write(vtd.IQA_REG, QUEUE, 8)
    unit.command(vtd.GCMD_QIE)
    unit.memory.write_u64(QUEUE, 2 | 1 << 4)  # a global IOTLB invalidation
    unit.memory.write_u64(QUEUE + 16, 5 | 1 << 5 | 1 << 4 | 0xCAFE << 32)  # wait: status write + IF
    unit.memory.write_u64(QUEUE + 24, 0x9000)
    unit.write(vtd.IQT_REG, 2 << 4, 8)
    assert unit.read(vtd.IQH_REG, 8) == 2 << 4
    assert unit.memory.read_u32(0x9000) == 0xCAFE
    assert unit.read(vtd.ICS_REG) & vtd.ICS_IWC


def test_an_unknown_descriptor_stops_the_queue_with_iqe(unit: Unit) -> None:
    unit.write(vtd.IQA_REG, QUEUE, 8)
    unit.command(vtd.GCMD_QIE)
    unit.memory.write_u64(QUEUE, 0xF)
    unit.write(vtd.IQT_REG, 1 << 4, 8)
    assert unit.read(vtd.IQH_REG, 8) == 0 and unit.read(vtd.FSTS_REG) & vtd.FSTS_IQE
    unit.write(vtd.FSTS_REG, vtd.FSTS_IQE)
    assert not unit.read(vtd.FSTS_REG) & vtd.FSTS_IQE


def test_a_remappable_msi_becomes_its_irte(unit: Unit) -> None:
    unit.irte(2, vector=0xEE, destination=1)
    unit.enable_remapping()
    message = unit.iommu.remap_msi(SOURCE, 0xFEE0_0000 | 2 << 5 | vtd.MSI_REMAPPABLE, 0)
    assert message == (0xFEE0_1000, 0xEE | 1 << 14)
    # SHV: the subhandle in the data is added to the handle.
    assert unit.iommu.remap_msi(SOURCE, 0xFEE0_0000 | 1 << 5 | vtd.MSI_REMAPPABLE | vtd.MSI_SHV, 1) == message


@pytest.mark.parametrize(
    ("prepare", "address", "reason"),
    [
        (lambda u: None, 0xFEE0_0000 | 3 << 5 | vtd.MSI_REMAPPABLE, vtd.FR_IR_NOT_PRESENT),
        (lambda u: u.irte(2, 0xEE, source=0x18), 0xFEE0_0000 | 2 << 5 | vtd.MSI_REMAPPABLE, vtd.FR_IR_SOURCE_ID),
        (lambda u: u.irte(2, 0xEE, extra=1 << 15), 0xFEE0_0000 | 2 << 5 | vtd.MSI_REMAPPABLE, vtd.FR_IR_ENTRY_RESERVED),
        (lambda u: None, 0xFEE0_0000 | 0x7FFF << 5 | vtd.MSI_REMAPPABLE, vtd.FR_IR_INDEX_BEYOND_SIZE),
        (lambda u: None, 0xFEE0_1000, vtd.FR_IR_COMPATIBILITY_BLOCKED),
    ],
)
def test_interrupt_requests_that_are_blocked(unit: Unit, prepare: object, address: int, reason: int) -> None:
    prepare(unit)  # type: ignore[operator]
    unit.enable_remapping(size_field=3)  # 16 entries
    assert unit.iommu.remap_msi(SOURCE, address, 0) is None
    assert (unit.read(vtd.FRCD_OFFSET + 8, 8) >> 32) & 0xFF == reason


def test_compatibility_format_passes_with_cfi_or_without_remapping(unit: Unit) -> None:
    assert unit.iommu.remap_msi(SOURCE, 0xFEE0_0000, 0x30) == (0xFEE0_0000, 0x30)  # IRE clear
    unit.enable_remapping()
    unit.command(vtd.GCMD_CFI)
    assert unit.iommu.remap_msi(SOURCE, 0xFEE0_0000, 0x30) == (0xFEE0_0000, 0x30)


class FakeVm:
    def __init__(self, entry: int) -> None:
        self.entry = entry
        self.lines: list[tuple[int, bool]] = []
        self.messages: list[tuple[int, int]] = []

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.lines.append((irq, level))

    def signal_msi(self, address: int, data: int) -> bool:
        self.messages.append((address, data))
        return True

    def ioapic_redirection_entry(self, pin: int) -> int:
        return self.entry


def test_intx_through_a_remappable_ioapic_entry_goes_as_the_irte_says(unit: Unit) -> None:
    unit.irte(1, vector=0xED, destination=2, source=0x1234)  # the IOAPIC's requests are not SID-checked
    unit.enable_remapping()
    entry = 0xED | 1 << 48 | 1 << 49  # remappable format, index 1 (lib/x86/intel-iommu.c)
    vm = FakeVm(entry)
    route = RoutedPciInterrupts(vm, 23, SOURCE, unit.iommu)
    route.set_intx(True)
    route.set_intx(False)
    assert vm.messages == [(0xFEE0_2000, 0xED | 1 << 14)] and vm.lines == []
    vm.entry = entry | 1 << 16  # masked: nothing
    route.set_intx(True)
    assert len(vm.messages) == 1


def test_intx_without_remapping_is_kvms_ioapic_line(unit: Unit) -> None:
    vm = FakeVm(0)
    route = RoutedPciInterrupts(vm, 23, SOURCE, unit.iommu)
    route.set_intx(True)
    route.set_intx(False)
    assert vm.lines == [(23, True), (23, False)]
    unit.enable_remapping()
    route.set_intx(True)  # a compatibility-format entry with remapping on and CFI clear: blocked
    assert vm.lines == [(23, True), (23, False)] and vm.messages == []
    assert (unit.read(vtd.FRCD_OFFSET + 8, 8) >> 32) & 0xFF == vtd.FR_IR_COMPATIBILITY_BLOCKED


def test_msi_without_an_iommu_goes_straight_to_kvm() -> None:
    vm = FakeVm(0)
    RoutedPciInterrupts(vm, 23, SOURCE, None).send_msi(0xFEE0_0000, 0x41)
    assert vm.messages == [(0xFEE0_0000, 0x41)]


def test_odd_register_writes_are_ignored(unit: Unit) -> None:
    assert unit.bus.write(vtd.IOMMU_ADDRESS + vtd.GCMD_REG, b"\xff")  # a byte: dropped
    assert unit.read(vtd.GSTS_REG) == 0
    unit.write(vtd.VER_REG, 0)  # read-only
    assert unit.read(vtd.VER_REG) == 0x10
