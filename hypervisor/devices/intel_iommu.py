"""An Intel VT-d remapping unit: DMA remapping and interrupt remapping for pyhv's PCI devices.

Intel Virtualization Technology for Directed I/O, Architecture Specification (rev. 4.x), as
QEMU's `-device intel-iommu` presents it on its q35 machine: one remapping unit whose registers
are the 4 KiB page at 0xfed90000 (where QEMU's q35 puts it, and where kvm-unit-tests'
lib/x86/intel-iommu.c looks), covering every PCI device of bus 0. What it offers:

- registers (§11.4): version 1.0; CAP with 16-bit domain IDs, a 39-bit (3-level) adjusted
  guest address width, 2 MiB and 1 GiB pages, one fault recording register; ECAP with coherent
  table walks (C), queued invalidation (QI), interrupt remapping (IR, xAPIC format: no EIM) and
  pass-through (PT);
- DMA remapping in legacy mode (§3.4.2, §3.7): root table, context entries with translation type
  0 (second-level tables) or 2 (pass-through), 3-level second-level paging with large pages and
  R/W checks;
- interrupt remapping (§5.1): remappable-format MSIs and IOAPIC entries are looked up in the
  interrupt remapping table, checked (present, size, reserved fields, source ID), and delivered
  in compatibility format; compatibility-format requests are blocked unless the guest set CFI;
- faults (§7.2.1) recorded in the one fault recording register, with the fault event interrupt
  when it is unmasked; context-cache, IOTLB and interrupt-entry-cache invalidations, through
  the registers or the invalidation queue (§6.5.2), including the wait descriptor's status
  write and interrupt.

pyhv caches no translation: every DMA walks the tables the guest wrote, so an invalidation has
nothing to drop and completes at once (a cache-less implementation of the architecture). The
remapping tables are read with the guest's memory as they are at the time of the request.

Not modelled: the ACPI DMAR table (guests that discover the unit through ACPI, such as Linux,
do not see it; kvm-unit-tests uses the fixed address), scalable mode, first-level tables,
device TLBs, posted interrupts, x2APIC (EIM) and protected memory regions. The IOAPIC is KVM's,
so its other inputs (PIT, serial, virtio-mmio) reach the CPUs without this unit; only the PCI
functions pyhv emulates send their interrupts through it (hypervisor/devices/pci_interrupts.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypervisor.devices.gate import GatedDevice

if TYPE_CHECKING:
    from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

IOMMU_ADDRESS = 0xFED9_0000  # QEMU's Q35_HOST_BRIDGE_IOMMU_ADDR
REGISTERS_SIZE = 0x1000
PAGE = 0x1000

# Register offsets (§11.4, table 11-2).
VER_REG = 0x00
CAP_REG = 0x08
ECAP_REG = 0x10
GCMD_REG = 0x18
GSTS_REG = 0x1C
RTADDR_REG = 0x20
CCMD_REG = 0x28
FSTS_REG = 0x34
FECTL_REG = 0x38
FEDATA_REG = 0x3C
FEADDR_REG = 0x40
FEUADDR_REG = 0x44
IQH_REG = 0x80
IQT_REG = 0x88
IQA_REG = 0x90
ICS_REG = 0x9C
IECTL_REG = 0xA0
IEDATA_REG = 0xA4
IEADDR_REG = 0xA8
IEUADDR_REG = 0xAC
IRTA_REG = 0xB8
IOTLB_OFFSET = 0x200  # IVA_REG, then IOTLB_REG at +8 (ECAP.IRO, in 16-byte units)
FRCD_OFFSET = 0x220  # the fault recording register (CAP.FRO, in 16-byte units)
PLAIN_DWORDS = (RTADDR_REG, RTADDR_REG + 4, CCMD_REG, FEDATA_REG, FEADDR_REG, FEUADDR_REG, IQA_REG,
                IQA_REG + 4, IEDATA_REG, IEADDR_REG, IEUADDR_REG, IRTA_REG, IRTA_REG + 4, IOTLB_OFFSET,
                IOTLB_OFFSET + 4, IOTLB_OFFSET + 8)  # fmt: skip

VERSION = 0x10  # major 1, minor 0
CAP = (
    6  # ND: 16-bit domain IDs
    | 0x2 << 8  # SAGAW: 39-bit, 3-level tables
    | 38 << 16  # MGAW: 39 bits
    | (FRCD_OFFSET // 16) << 24  # FRO
    | 0x3 << 34  # SLLPS: 2 MiB and 1 GiB pages
)  # NFR = 0: one fault recording register
ECAP = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 6 | (IOTLB_OFFSET // 16) << 8  # C, QI, IR, PT, IRO
ADDRESS_WIDTH = 39

# Global command / status bits (§11.4.4, §11.4.5).
GCMD_TE = 1 << 31
GCMD_SRTP = 1 << 30
GCMD_QIE = 1 << 26
GCMD_IRE = 1 << 25
GCMD_SIRTP = 1 << 24
GCMD_CFI = 1 << 23
FOLLOWED_BITS = GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI  # status mirrors the command bit

# Fault status (§11.4.9) and control (§11.4.10) bits.
FSTS_PFO = 1 << 0
FSTS_PPF = 1 << 1
FSTS_IQE = 1 << 4
FSTS_WRITE_ONE_TO_CLEAR = 0x7D  # PFO, AFO, APF, IQE, ICE, ITE
CTL_IM = 1 << 31  # interrupt mask, of FECTL and IECTL
CTL_IP = 1 << 30  # interrupt pending
ICS_IWC = 1 << 0

# Fault reasons (§7.2.1 appendix A, table "Non-recoverable fault reason encodings").
FR_ROOT_NOT_PRESENT = 0x1
FR_CONTEXT_NOT_PRESENT = 0x2
FR_CONTEXT_INVALID = 0x3
FR_ADDRESS_BEYOND_AW = 0x4
FR_WRITE_DENIED = 0x5
FR_READ_DENIED = 0x6
FR_TABLE_ACCESS = 0x7
FR_ROOT_TABLE_ACCESS = 0x8
FR_ROOT_RESERVED = 0xA
FR_CONTEXT_RESERVED = 0xB
FR_IR_REQUEST_RESERVED = 0x20
FR_IR_INDEX_BEYOND_SIZE = 0x21
FR_IR_NOT_PRESENT = 0x22
FR_IR_TABLE_ACCESS = 0x23
FR_IR_ENTRY_RESERVED = 0x24
FR_IR_COMPATIBILITY_BLOCKED = 0x25
FR_IR_SOURCE_ID = 0x26

ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of table pointers and page addresses
PTE_READ = 1 << 0
PTE_WRITE = 1 << 1
PTE_LARGE = 1 << 7
MSI_ADDRESS_HEAD = 0xFEE0_0000
MSI_REMAPPABLE = 1 << 4  # interrupt format bit of a remappable MSI address (§5.1.5.2)
MSI_SHV = 1 << 3
IOAPIC_REMAPPABLE = 1 << 48  # interrupt format bit of an IOAPIC entry (§5.1.5.1)


class Fault(Exception):
    """A remapping fault: its reason code and whether the context entry disabled reporting."""

    def __init__(self, reason: int, address: int = 0, suppressed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address
        self.suppressed = suppressed


class IntelIommu(GatedDevice):
    """The remapping unit's registers, and the translations the PCI devices ask it for."""

    def __init__(self, memory: GuestMemory, send_msi: Callable[[int, int], object]) -> None:
        self._memory = memory
        self._send_msi = send_msi  # compatibility-format delivery (fault and wait events)
        self._registers = bytearray(REGISTERS_SIZE)
        self._put(VER_REG, 4, VERSION)
        self._put(CAP_REG, 8, CAP)
        self._put(ECAP_REG, 8, ECAP)
        self._put(FECTL_REG, 4, CTL_IM)
        self._put(IECTL_REG, 4, CTL_IM)
        self._root_table = 0  # latched by SRTP
        self._interrupt_table = 0  # IRTA latched by SIRTP
        self.faults = 0  # every fault, reported or not (tests and the debugger read it)

    # -- the register file -------------------------------------------------------------------

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._registers[offset : offset + size], "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self._registers[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _status(self) -> int:
        return self._get(GSTS_REG, 4)

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        # §11.2: registers are read as aligned 32- or 64-bit quantities; anything else is
        # undefined, and pyhv answers with the bytes there.
        data[:] = self._registers[offset : offset + len(data)]

    def _write(self, offset: int, data: bytes) -> None:
        if len(data) not in (4, 8) or offset % 4:
            log.warning("intel-iommu: %d-byte write at register offset %#x ignored (§11.2: 32 or 64 bits)",
                        len(data), offset)  # fmt: skip
            return
        for index in range(0, len(data), 4):  # a 64-bit write is its two halves, low first
            self._write_dword(offset + index, int.from_bytes(data[index : index + 4], "little"))

    def _write_dword(self, offset: int, value: int) -> None:
        if offset in PLAIN_DWORDS:
            self._put(offset, 4, value)
        elif offset == GCMD_REG:
            self._command(value)
        elif offset == CCMD_REG + 4:
            # ICC (bit 63): invalidate the context cache; done at once, with CAIG = CIRG.
            if value & 1 << 31:
                value = (value & ~(1 << 31) & ~(3 << 27)) | ((value >> 29) & 3) << 27
            self._put(offset, 4, value)
        elif offset == IOTLB_OFFSET + 12:
            # IVT (bit 63): invalidate the IOTLB; done at once, with IAIG = IIRG.
            if value & 1 << 31:
                value = (value & ~(1 << 31) & ~(3 << 25)) | ((value >> 28) & 3) << 25
            self._put(offset, 4, value)
        elif offset == FSTS_REG:
            self._put(FSTS_REG, 4, self._get(FSTS_REG, 4) & ~(value & FSTS_WRITE_ONE_TO_CLEAR))
        elif offset in (FECTL_REG, IECTL_REG):
            self._set_control(offset, value)
        elif offset == IQT_REG:
            self._put(IQT_REG, 4, value & 0x7FFF0)  # QT, bits 18:4
            self._process_queue()
        elif offset == ICS_REG:
            if value & ICS_IWC:
                self._put(ICS_REG, 4, 0)
        elif offset == FRCD_OFFSET + 12:
            if value & 1 << 31:  # F is write-1-to-clear
                self._put(FRCD_OFFSET, 16, 0)
                self._put(FSTS_REG, 4, self._get(FSTS_REG, 4) & ~FSTS_PPF)
        # Everything else is read-only or reserved: the write is dropped.

    def _command(self, value: int) -> None:
        """GCMD (§11.4.4): the status bits follow, one-shot commands take effect at once."""
        status = (self._status() & ~FOLLOWED_BITS) | (value & FOLLOWED_BITS)
        if value & GCMD_SRTP:
            if self._get(RTADDR_REG, 8) & 0xC00:
                log.warning("intel-iommu: RTADDR asks for a scalable or extended root table, which pyhv does "
                            "not offer (ECAP.SMTS = 0); legacy mode is used")  # fmt: skip
            self._root_table = self._get(RTADDR_REG, 8) & ADDRESS_MASK
            status |= GCMD_SRTP  # RTPS
        if value & GCMD_SIRTP:
            self._interrupt_table = self._get(IRTA_REG, 8)
            status |= GCMD_SIRTP  # IRTPS
        if value & GCMD_QIE and not self._status() & GCMD_QIE:
            self._put(IQH_REG, 8, 0)  # §6.5.2: the queue starts at its head
        self._put(GSTS_REG, 4, status)

    def _set_control(self, offset: int, value: int) -> None:
        control = (self._get(offset, 4) & CTL_IP) | (value & CTL_IM)
        if not control & CTL_IM and control & CTL_IP:  # unmasked with an event pending: send it
            control &= ~CTL_IP
            self._event(offset)
        self._put(offset, 4, control)

    def _event(self, control_offset: int) -> None:
        """The fault event or invalidation completion interrupt, from its data/address
        registers (§7.3, §6.5.2.10); these interrupts are never remapped."""
        data = self._get(control_offset + 4, 4)
        address = self._get(control_offset + 8, 4) | self._get(control_offset + 12, 4) << 32
        self._post(self._send_msi, address, data)

    def _signal(self, control_offset: int) -> None:
        control = self._get(control_offset, 4)
        if control & CTL_IM:
            self._put(control_offset, 4, control | CTL_IP)
        else:
            self._event(control_offset)

    # -- the invalidation queue (§6.5.2) ---------------------------------------------------------

    def _process_queue(self) -> None:
        if not self._status() & GCMD_QIE:
            return
        queue = self._get(IQA_REG, 8)
        base = queue & ADDRESS_MASK
        entries = (PAGE << (queue & 7)) // 16
        head = self._get(IQH_REG, 8) >> 4
        tail = self._get(IQT_REG, 8) >> 4
        while head != tail:
            descriptor = base + 16 * head
            if head >= entries or not self._memory.contains(descriptor, 16):
                self._queue_error(head)
                return
            low = self._memory.read_u64(descriptor)
            high = self._memory.read_u64(descriptor + 8)
            kind = low & 0xF
            if kind == 5:  # invalidation wait
                if low & 1 << 5:  # SW: write the status data
                    status_address = high & ~3
                    if not self._memory.contains(status_address, 4):
                        self._queue_error(head)
                        return
                    self._memory.write_u32(status_address, low >> 32)
                if low & 1 << 4:  # IF: the completion interrupt
                    self._put(ICS_REG, 4, ICS_IWC)
                    self._signal(IECTL_REG)
            elif kind not in (1, 2, 3, 4, 6, 7):  # cache invalidations: nothing is cached
                self._queue_error(head)
                return
            head = (head + 1) % entries
            self._put(IQH_REG, 8, head << 4)

    def _queue_error(self, head: int) -> None:
        """An invalid descriptor: IQE, and the queue stops at it (IQH points there, §6.5.2.10)."""
        log.warning("intel-iommu: invalidation queue error at descriptor %d", head)
        self._put(IQH_REG, 8, head << 4)
        self._put(FSTS_REG, 4, self._get(FSTS_REG, 4) | FSTS_IQE)
        self._signal(FECTL_REG)

    # -- faults (§7.2.1) ------------------------------------------------------------------------

    def _record(self, fault: Fault, source_id: int, write: bool) -> None:
        self.faults += 1
        log.info("intel-iommu: fault %#x for requester %02x:%02x.%x at %#x%s", fault.reason, source_id >> 8,
                 (source_id >> 3) & 0x1F, source_id & 7, fault.address,
                 " (reporting disabled by its context entry)" if fault.suppressed else "")  # fmt: skip
        if fault.suppressed:
            return
        status = self._get(FSTS_REG, 4)
        if self._get(FRCD_OFFSET + 8, 8) >> 63:  # the one recording register is full
            self._put(FSTS_REG, 4, status | FSTS_PFO)
            return
        self._put(FRCD_OFFSET, 8, fault.address & ~0xFFF)
        read = 0 if write else 1
        self._put(FRCD_OFFSET + 8, 8, 1 << 63 | read << 62 | fault.reason << 32 | source_id)
        self._put(FSTS_REG, 4, status | FSTS_PPF)
        self._signal(FECTL_REG)

    # -- DMA remapping (hypervisor.devices.edu.DmaSpace) -------------------------------------------

    def dma_read(self, source_id: int, address: int, length: int) -> bytes | None:
        return self._serialised(self._dma, source_id, address, length, None)

    def dma_write(self, source_id: int, address: int, data: bytes) -> bool:
        return self._serialised(self._dma, source_id, address, len(data), data) is not None

    def _dma(self, source_id: int, address: int, length: int, data: bytes | None) -> bytes | None:
        """Moves `length` bytes page by page through the translation; None when any page
        faults or lies outside RAM (the whole request is refused before anything moves)."""
        write = data is not None
        pieces: list[tuple[int, int, int]] = []  # guest physical address, offset, length
        done = 0
        while done < length:
            iova = address + done
            chunk = min(length - done, PAGE - (iova & (PAGE - 1)))
            try:
                physical = self._translate(source_id, iova, write)
            except Fault as fault:
                self._record(fault, source_id, write)
                return None
            if not self._memory.contains(physical, chunk):
                log.warning("intel-iommu: DMA to %#x (from %#x) is not guest RAM", physical, iova)
                return None
            pieces.append((physical, done, chunk))
            done += chunk
        if data is not None:
            for physical, offset, chunk in pieces:
                self._memory.write(physical, data[offset : offset + chunk])
            return b""
        return b"".join(self._memory.read(physical, chunk) for physical, _offset, chunk in pieces)

    def _table_entry(self, address: int, reason: int) -> tuple[int, int]:
        if not self._memory.contains(address, 16):
            raise Fault(reason, address)
        return self._memory.read_u64(address), self._memory.read_u64(address + 8)

    def _translate(self, source_id: int, iova: int, write: bool) -> int:
        """The guest physical address of `iova` for requester `source_id` (§3.4.2, §3.7)."""
        if not self._status() & GCMD_TE:
            return iova
        root_low, root_high = self._table_entry(self._root_table + 16 * (source_id >> 8), FR_ROOT_TABLE_ACCESS)
        if not root_low & 1:
            raise Fault(FR_ROOT_NOT_PRESENT, iova)
        if root_low & 0xFFE or root_high or root_low & ~ADDRESS_MASK & ~0xFFF:
            raise Fault(FR_ROOT_RESERVED, iova)
        context_address = (root_low & ADDRESS_MASK) + 16 * (source_id & 0xFF)
        context_low, context_high = self._table_entry(context_address, FR_TABLE_ACCESS)
        if not context_low & 1:
            raise Fault(FR_CONTEXT_NOT_PRESENT, iova)
        suppressed = bool(context_low & 2)  # FPD
        translation_type = (context_low >> 2) & 3
        if context_low & 0xFF0 or context_high & ~0xFFFF7F:  # reserved: bits 11:4, 127:88, 71
            raise Fault(FR_CONTEXT_RESERVED, iova, suppressed)
        if translation_type == 2:  # pass-through (ECAP.PT)
            return iova
        if translation_type != 0 or context_high & 7 != 1:  # only 3-level tables (SAGAW bit 1)
            raise Fault(FR_CONTEXT_INVALID, iova, suppressed)
        if iova >> ADDRESS_WIDTH:
            raise Fault(FR_ADDRESS_BEYOND_AW, iova, suppressed)
        table = context_low & ADDRESS_MASK
        needed = PTE_WRITE if write else PTE_READ
        for level in (3, 2, 1):
            shift = 12 + 9 * (level - 1)
            entry_address = table + 8 * ((iova >> shift) & 0x1FF)
            if not self._memory.contains(entry_address, 8):
                raise Fault(FR_TABLE_ACCESS, iova, suppressed)
            entry = self._memory.read_u64(entry_address)
            if not entry & needed:  # permissions are checked at every level (§3.7.1)
                raise Fault(FR_WRITE_DENIED if write else FR_READ_DENIED, iova, suppressed)
            if level == 1 or entry & PTE_LARGE:
                page_mask = (1 << shift) - 1
                return (entry & ADDRESS_MASK & ~page_mask) | (iova & page_mask)
            table = entry & ADDRESS_MASK
        raise AssertionError("unreachable")

    # -- interrupt remapping (§5.1) -------------------------------------------------------------

    def remaps_interrupts(self) -> bool:
        """IRES: interrupt requests go through the remapping table."""
        return bool(self._serialised(self._status) & GCMD_IRE)

    def passes_compatibility_format(self) -> bool:
        """CFIS (or IRES clear): compatibility-format requests pass unchanged (§5.1.2.1)."""
        status = self._serialised(self._status)
        return not status & GCMD_IRE or bool(status & GCMD_CFI)

    def remap_msi(self, source_id: int | None, address: int, data: int) -> tuple[int, int] | None:
        """The compatibility-format MSI an interrupt request becomes, or None when it is
        blocked (a fault, recorded). `source_id` None: a request whose requester is not
        checked (the IOAPIC's, as in QEMU, whose IOAPIC sends without a requester ID)."""
        return self._serialised(self._remap, source_id, address, data)

    def remap_ioapic_entry(self, entry: int) -> tuple[int, int] | None:
        """An IOAPIC redirection entry's interrupt: a remappable-format entry carries its
        interrupt index as an MSI address would (§5.1.5.1: index[14:0] in bits 63:49,
        index[15] in bit 11)."""
        index = (entry >> 49) & 0x7FFF | ((entry >> 11) & 1) << 15
        if not entry & IOAPIC_REMAPPABLE:
            vector, mode, logical = entry & 0xFF, (entry >> 8) & 7, (entry >> 11) & 1
            address = MSI_ADDRESS_HEAD | (entry >> 56) << 12 | logical << 2
            return self.remap_msi(None, address, vector | mode << 8 | ((entry >> 15) & 1) << 15)
        address = MSI_ADDRESS_HEAD | (index & 0x7FFF) << 5 | MSI_REMAPPABLE | (index >> 15) << 2
        return self.remap_msi(None, address, 0)

    def _remap(self, source_id: int | None, address: int, data: int) -> tuple[int, int] | None:
        status = self._status()
        if not status & GCMD_IRE:
            return address, data
        requester = source_id if source_id is not None else 0
        if not address & MSI_REMAPPABLE:
            if status & GCMD_CFI:
                return address, data
            self._record(Fault(FR_IR_COMPATIBILITY_BLOCKED, 0), requester, write=True)
            return None
        try:
            return self._remapped(source_id, address, data)
        except Fault as fault:
            self._record(fault, requester, write=True)
            return None

    def _remapped(self, source_id: int | None, address: int, data: int) -> tuple[int, int]:
        handle = (address >> 5) & 0x7FFF | ((address >> 2) & 1) << 15
        index = handle + (data & 0xFFFF) if address & MSI_SHV else handle
        if address & 3 or (address & MSI_SHV and data >> 16):
            raise Fault(FR_IR_REQUEST_RESERVED, index << 12)
        table = self._interrupt_table
        if index >= 1 << ((table & 0xF) + 1):
            raise Fault(FR_IR_INDEX_BEYOND_SIZE, index << 12)
        low, high = self._table_entry((table & ADDRESS_MASK) + 16 * index, FR_IR_TABLE_ACCESS)
        if not low & 1:
            raise Fault(FR_IR_NOT_PRESENT, index << 12)
        suppressed = bool(low & 2)  # FPD
        # Remapped format, xAPIC mode: reserved bits 14:12, 31:24, 39:32, 63:48 and 127:84; IM
        # (bit 15) asks for posting, which pyhv does not offer (ECAP.PI = 0).
        if low & 0xFFFF_00FF_FF00_F000 or high >> 20:
            raise Fault(FR_IR_ENTRY_RESERVED, index << 12, suppressed)
        if source_id is not None and not _source_matches(high, source_id):
            raise Fault(FR_IR_SOURCE_ID, index << 12, suppressed)
        destination = (low >> 40) & 0xFF  # xAPIC: DST bits 15:8
        mode, trigger, vector = (low >> 5) & 7, (low >> 4) & 1, (low >> 16) & 0xFF
        redirection_hint, logical = (low >> 3) & 1, (low >> 2) & 1
        compatible_address = MSI_ADDRESS_HEAD | destination << 12 | redirection_hint << 3 | logical << 2
        return compatible_address, vector | mode << 8 | 1 << 14 | trigger << 15


def _source_matches(high: int, source_id: int) -> bool:
    """The IRTE's source validation (§9.10: SVT, SQ and SID in bits 83:64)."""
    expected, qualifier, validation = high & 0xFFFF, (high >> 16) & 3, (high >> 18) & 3
    if validation == 0:
        return True
    if validation == 1:
        ignored = (0, 0b100, 0b110, 0b111)[qualifier]  # SQ: function bits that are not compared
        return (expected & ~ignored) == (source_id & ~ignored)
    if validation == 2:  # the requester's bus within [start bus, end bus]
        return (expected >> 8) <= (source_id >> 8) <= (expected & 0xFF)
    return False
