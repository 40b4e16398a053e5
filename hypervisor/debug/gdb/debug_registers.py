"""Hardware breakpoints and watchpoints in DR0-DR3 and DR7 (Intel SDM Vol. 3B §17.2).

DR0-DR3 hold linear addresses; DR7 enables each (L0-L3, bits 0, 2, 4, 6) and gives its
condition (R/W0-3, bits 16+4n: 00 execute, 01 write, 11 read or write; x86 has no read-only
condition, so gdb's read watchpoint uses 11 and gdb tells reads from writes by the value) and its
length (LEN0-3, bits 18+4n: 00 one byte, 01 two, 11 four, 10 eight; the address must be aligned
to it, §17.2.5). DR6 bits B0-B3 say which slot triggered, BS a single step (§17.2.3).

A watchpoint gdb asks for that is longer or less aligned than one slot allows is split over
several slots; a request that does not fit in the free slots is refused as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.debug.gdb.target import BreakKind, GdbTargetError

SLOTS = 4
DR7_LOCAL_EXACT = 1 << 8  # LE: recommended with data breakpoints (§17.2.4)
DR7_RESERVED_ONE = 1 << 10  # bit 10 reads as 1
DR6_SINGLE_STEP = 1 << 14  # BS
ENOSPC = 28
EINVAL = 22

CONDITION = {
    BreakKind.HARDWARE: 0b00,
    BreakKind.WRITE_WATCH: 0b01,
    BreakKind.READ_WATCH: 0b11,
    BreakKind.ACCESS_WATCH: 0b11,
}
LENGTH_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


@dataclass(frozen=True)
class Slot:
    kind: BreakKind
    address: int  # what this slot watches
    length: int
    request_address: int  # the gdb request it belongs to (reported as watch:ADDR)
    request_length: int


def split_aligned(address: int, length: int) -> list[tuple[int, int]]:
    """[(address, size)] of naturally aligned 1/2/4/8-byte pieces covering the range."""
    pieces = []
    end = address + length
    while address < end:
        size = 8
        while size > 1 and (address % size or address + size > end):
            size //= 2
        pieces.append((address, size))
        address += size
    return pieces


class DebugRegisters:
    def __init__(self) -> None:
        self.slots: list[Slot | None] = [None] * SLOTS

    def insert(self, kind: BreakKind, address: int, length: int) -> None:
        if kind not in CONDITION:
            raise GdbTargetError(f"{kind.name} is not a debug-register breakpoint", EINVAL)
        if kind is BreakKind.HARDWARE:
            pieces = [(address, 1)]  # instruction breakpoints use LEN 00 (§17.2.5)
        else:
            if not 1 <= length <= 8 * SLOTS:
                raise GdbTargetError(f"cannot watch {length} bytes with {SLOTS} debug registers", EINVAL)
            pieces = split_aligned(address, length)
        free = [index for index, slot in enumerate(self.slots) if slot is None]
        if len(pieces) > len(free):
            raise GdbTargetError(
                f"needs {len(pieces)} debug register(s), {len(free)} of {SLOTS} are free (DR0-DR3)", ENOSPC
            )
        for index, (piece, size) in zip(free, pieces, strict=False):
            self.slots[index] = Slot(kind, piece, size, address, length)

    def remove(self, kind: BreakKind, address: int, length: int) -> None:
        found = False
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.kind is kind and slot.request_address == address:
                if kind is BreakKind.HARDWARE or slot.request_length == length:
                    self.slots[index] = None
                    found = True
        if not found:
            raise GdbTargetError(f"no {kind.name.lower()} breakpoint at {address:#x}", EINVAL)

    def clear(self) -> None:
        self.slots = [None] * SLOTS

    @property
    def in_use(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def values(self) -> list[int]:
        """DR0-DR7 for KVM_SET_GUEST_DEBUG (DR4/DR5 alias DR6/DR7 and stay 0; DR6 is KVM's)."""
        registers = [0] * 8
        dr7 = DR7_RESERVED_ONE
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            registers[index] = slot.address
            dr7 |= 1 << (2 * index)  # Ln: local enable
            dr7 |= CONDITION[slot.kind] << (16 + 4 * index)
            dr7 |= LENGTH_BITS[slot.length] << (18 + 4 * index)
            if slot.kind is not BreakKind.HARDWARE:
                dr7 |= DR7_LOCAL_EXACT
        registers[7] = dr7
        return registers

    def hit(self, dr6: int) -> Slot | None:
        """The slot DR6 says triggered (the lowest one when several did), if it is ours."""
        for index, slot in enumerate(self.slots):
            if dr6 & (1 << index) and slot is not None:
                return slot
        return None
