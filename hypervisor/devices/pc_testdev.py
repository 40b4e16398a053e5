"""QEMU's pc-testdev: ports and a memory window that KVM's own unit tests drive.

The device of QEMU hw/misc/pc-testdev.c, rebuilt from its documented behaviour; kvm-unit-tests
(lib/x86/apic.c set_irq_line, x86/realmode.c, x86/emulator.c, x86/eventinj.c) and guests
written for QEMU's test setup use it:

- ports 0xe0-0xe3: a 32-bit scratch register, any access width, each byte at its offset;
  ports 0xe8-0xeb: the same register seen byte by byte (QEMU splits wider accesses);
- port 0xe4 (32-bit writes): "flush page": the guest page holding the written address is
  unmapped and remapped on the host, so KVM must fault it back in (eventinj tests event
  delivery across such a fault);
- ports 0x2000-0x2017 (byte writes): ISA interrupt line n follows the written value (0 low,
  anything else high);
- MMIO 0xff000000-0xff00ffff: 64 KiB of scratch memory that is not RAM, so every access exits
  to the VMM (the emulator test runs string and other instructions against it).

Each part runs under the bus lock of its own (hypervisor.devices.gate; the scratch register is
one device at two ranges, so one lock); a page flush and an interrupt line change are effects,
performed after that lock is released.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypervisor.devices.gate import GatedDevice

if TYPE_CHECKING:
    from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

SCRATCH_PORT = 0xE0
SCRATCH_PORT_COUNT = 4
FLUSH_PAGE_PORT = 0xE4
FLUSH_PAGE_PORT_COUNT = 4
SCRATCH_BYTE_PORT = 0xE8
SCRATCH_BYTE_PORT_COUNT = 4
IRQ_PORT = 0x2000
IRQ_LINES = 24  # one port per IOAPIC input
IOMEM_ADDRESS = 0xFF00_0000
IOMEM_SIZE = 0x1_0000
PAGE_SIZE = mmap.PAGESIZE
PROT_NONE = 0  # <sys/mman.h>; Python's mmap module has no name for it


class ScratchRegister(GatedDevice):
    """The 32-bit register behind 0xe0 and 0xe8; a write replaces the bytes it covers."""

    def __init__(self) -> None:
        self._value = bytearray(SCRATCH_PORT_COUNT)

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(self._value[(offset + index) % SCRATCH_PORT_COUNT] for index in range(len(data)))

    def _write(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            self._value[(offset + index) % SCRATCH_PORT_COUNT] = byte


class FlushPage(GatedDevice):
    """Port 0xe4: `flush(gpa)` drops the host mapping of the page at the written address."""

    def __init__(self, flush: Callable[[int], None]) -> None:
        self._flush = flush

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)  # write-only in QEMU

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:  # QEMU accepts 32-bit writes only
            self._access(self._post, self._flush, int.from_bytes(data, "little") & ~(PAGE_SIZE - 1))


class IrqLines(GatedDevice):
    """Ports 0x2000 + n: a byte written sets ISA interrupt line n to the value's truth.

    QEMU's region takes byte accesses, and its memory core splits a wider write into bytes, so
    `outl $1, $0x200b` (realmode's test) raises line 11 and lowers lines 12 to 14.
    """

    def __init__(self, set_line: Callable[[int, bool], None]) -> None:
        self._set_line = set_line

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)  # write-only

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _write(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            if offset + index < IRQ_LINES:
                self._post(self._set_line, offset + index, byte != 0)


class IoMemory(GatedDevice):
    """The 64 KiB MMIO window: plain little-endian scratch memory behind exits."""

    def __init__(self) -> None:
        self._buffer = bytearray(IOMEM_SIZE)

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        data[:] = self._buffer[offset : offset + len(data)]

    def _write(self, offset: int, data: bytes) -> None:
        self._buffer[offset : offset + len(data)] = data


class HostPageFlusher:
    """Unmaps and remaps one page of guest RAM on the host (mprotect PROT_NONE, then back).

    The protection change invalidates KVM's mapping of the page through the MMU notifier, the
    same effect QEMU's pc-testdev gets; the contents stay. Addresses outside RAM are ignored,
    as QEMU ignores them.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def __call__(self, gpa: int) -> None:
        for region in self._memory.regions:
            if region.gpa <= gpa < region.gpa + region.size:
                host = region.host_address + (gpa - region.gpa)
                if self._libc.mprotect(host, PAGE_SIZE, PROT_NONE) == 0:
                    self._libc.mprotect(host, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE)
                else:
                    log.warning("pc-testdev: cannot flush the page at %#x (errno %d)", gpa, ctypes.get_errno())
                return
        log.debug("pc-testdev: flush of %#x, which is not RAM, ignored", gpa)
