"""What a loader placed where: the command line, the initrd, and the result every loader returns.

boot.rst "THE KERNEL COMMAND LINE" and "Details of Header Fields" (cmdline_size, initrd_addr_max)
give the rules for the command line and the initrd; the placement checks apply to every entry
protocol, so that no structure silently overwrites another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hypervisor.boot.cpu_state import EntryState
from hypervisor.boot.layout import MiB
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

PAGE_SIZE = 0x1000


@dataclass(frozen=True)
class Placement:
    """A named range of guest physical memory a loader wrote."""

    name: str
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def overlaps(self, other: Placement) -> bool:
        return self.gpa < other.end and other.gpa < self.end


class MemoryPlan:
    """The ranges placed so far; refuses a new range that overlaps one already placed."""

    def __init__(self) -> None:
        self.placements: list[Placement] = []

    def place(self, name: str, gpa: int, size: int) -> Placement:
        new = Placement(name, gpa, size)
        for existing in self.placements:
            if size and existing.size and new.overlaps(existing):
                raise BootError(
                    f"the {name} at {gpa:#x}-{gpa + size:#x} would overlap the {existing.name} "
                    f"at {existing.gpa:#x}-{existing.end:#x}"
                )
        self.placements.append(new)
        return new


@dataclass
class BootImage:
    """The result of every loader: the vCPU state to enter with and what lies where.

    `protocol` is one of "linux-64" (boot.rst 64-bit entry with a zero page), "linux-32" (the
    bzImage 32-bit entry), "pvh", "multiboot", "raw". `placements` lists every range written.
    `source` says in words what kind of image was loaded and how.
    """

    entry: EntryState
    protocol: str
    placements: list[Placement] = field(default_factory=list)
    cmdline: str = ""
    source: str = ""  # what was loaded, for reports: "bzImage (lz4 payload unpacked on the host)"

    def find(self, name: str) -> Placement | None:
        return next((p for p in self.placements if p.name == name), None)


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The NUL-terminated command line, checked against `limit` bytes (without the NUL).

    boot.rst: cmdline_size is "the maximum size of the command line without the terminating
    zero"; protocols before 2.06 allow 255 bytes.
    """
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise BootError("the kernel command line contains a NUL character")
    if len(encoded) > limit:
        raise BootError(
            f"the kernel command line is {len(encoded)} bytes, beyond the kernel's limit of {limit}"
        )
    return encoded + b"\0"


def write_cmdline(memory: GuestMemory, plan: MemoryPlan, gpa: int, cmdline: str, limit: int) -> int:
    """Write the NUL-terminated command line at `gpa`; returns its address."""
    encoded = encode_cmdline(cmdline, limit)
    plan.place("command line", gpa, len(encoded))
    memory.write(gpa, encoded)
    return gpa


def place_initrd(memory: GuestMemory, plan: MemoryPlan, initrd: bytes, lowest: int, highest_end: int,
                 low_ram_end: int) -> int:
    """Copy `initrd` to the highest page-aligned address in [lowest, min(highest_end, RAM end)).

    `lowest` is the end of the kernel's footprint (its load range plus what it needs to unpack
    itself); `highest_end` is initrd_addr_max + 1. Returns the initrd's address.
    """
    top = min(highest_end, low_ram_end)
    address = (top - len(initrd)) & ~(PAGE_SIZE - 1)
    if address < lowest or top < len(initrd):
        size_mib = -(-len(initrd) // MiB)
        raise BootError(
            f"initrd of {size_mib} MiB does not fit in {low_ram_end // MiB} MiB of guest RAM below "
            f"{top:#x} above the kernel (which ends at {lowest:#x}); give the guest more memory"
        )
    plan.place("initrd", address, len(initrd))
    memory.write(address, initrd)
    log.debug("initrd of %d bytes at %#x", len(initrd), address)
    return address
