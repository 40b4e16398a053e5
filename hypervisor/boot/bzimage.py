"""bzImage parsing and loading, Documentation/x86/boot.rst.

A bzImage is the real-mode setup code ((setup_sects + 1) * 512 bytes, setup header at 0x1f1)
followed by the protected-mode kernel. pyhv never runs the real-mode part: it copies the setup
header into the zero page and enters the protected-mode kernel directly, through the 64-bit entry
(startup_64, 0x200 past the load address) when the kernel has one (protocol 2.12+ with
XLF_KERNEL_64) and through the 32-bit entry (startup_32, at the load address) otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hypervisor.boot.layout import HIMEM_START, MiB
from hypervisor.boot.zero_page import (
    BOOT_FLAG,
    DEFAULT_INITRD_ADDR_MAX,
    HEADER_MAGIC,
    LOADFLAG_LOADED_HIGH,
    OLD_CMDLINE_MAX,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    ZeroPage,
)
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # boot.rst: "If setup_sects is 0, the real value is 4."
MIN_PROTOCOL = 0x0202  # 2.02 introduced cmd_line_ptr; older kernels need the real-mode path
PROTOCOL_64BIT_ENTRY = 0x020C  # xloadflags (XLF_KERNEL_64) exist from 2.12
PROTOCOL_SYSSIZE = 0x0204  # syssize is reliable from 2.04
PROTOCOL_RELOCATABLE = 0x0205  # relocatable_kernel, kernel_alignment
PROTOCOL_CMDLINE_SIZE = 0x0206
PROTOCOL_PAYLOAD = 0x0208  # payload_offset and payload_length
PROTOCOL_INIT_SIZE = 0x020A  # pref_address and init_size
STARTUP_64_OFFSET = 0x200  # boot.rst "64-bit BOOT PROTOCOL": entry at load address + 0x200
HEADER_READ_END = 0x26C  # the header fields pyhv reads end here (protocol 2.15)
MIN_HEADER_BYTES = 0x208  # up to and including the protocol version


@dataclass(frozen=True)
class BzImage:
    """The validated setup header of a bzImage and its protected-mode kernel."""

    image: bytes
    header: ZeroPage  # the setup header copied into an otherwise empty zero page
    protocol: int
    setup_size: int

    @property
    def kernel(self) -> memoryview:
        return memoryview(self.image)[self.setup_size :]

    @property
    def payload(self) -> memoryview:
        """The compressed kernel inside the protected-mode code (empty before protocol 2.08 or
        when the header's payload fields point outside the file)."""
        if self.protocol < PROTOCOL_PAYLOAD:
            return memoryview(b"")
        offset, length = self.header.get("payload_offset"), self.header.get("payload_length")
        if offset + length > len(self.kernel):
            return memoryview(b"")
        return self.kernel[offset : offset + length]

    @property
    def has_64bit_entry(self) -> bool:
        return self.protocol >= PROTOCOL_64BIT_ENTRY and bool(self.header.get("xloadflags") & XLF_KERNEL_64)

    @property
    def relocatable(self) -> bool:
        return self.protocol >= PROTOCOL_RELOCATABLE and bool(self.header.get("relocatable_kernel"))

    @property
    def cmdline_limit(self) -> int:
        if self.protocol >= PROTOCOL_CMDLINE_SIZE:
            return self.header.get("cmdline_size")
        return OLD_CMDLINE_MAX

    @property
    def initrd_addr_max(self) -> int:
        # The field exists from 2.03; boot.rst gives 0x37ffffff for older kernels.
        return self.header.get("initrd_addr_max") if self.protocol >= 0x0203 else DEFAULT_INITRD_ADDR_MAX

    @property
    def init_size(self) -> int:
        """Bytes the kernel needs from its run address to unpack and start (boot.rst init_size)."""
        if self.protocol >= PROTOCOL_INIT_SIZE:
            return max(self.header.get("init_size"), len(self.kernel))
        return len(self.kernel)

    @property
    def pref_address(self) -> int:
        return self.header.get("pref_address") if self.protocol >= PROTOCOL_INIT_SIZE else HIMEM_START


def parse_bzimage(image: bytes, name: str = "the kernel") -> BzImage:
    """Validate the setup header of `image`; BootError with one clear line when it is unusable."""
    if len(image) < MIN_HEADER_BYTES:
        raise BootError(f"{name} is truncated: {len(image)} bytes is shorter than a bzImage setup header")
    header = ZeroPage()
    available = min(len(image), HEADER_READ_END)
    header.data[SETUP_HEADER_OFFSET:available] = image[SETUP_HEADER_OFFSET:available]
    if header.get("boot_flag") != BOOT_FLAG:
        raise BootError(f"{name} is not a bzImage: no boot flag 0xAA55 at offset 0x1fe")
    if header.get("header") != HEADER_MAGIC:
        raise BootError(f"{name} is not a bzImage: no 'HdrS' magic at offset 0x202 (boot protocol < 2.00)")
    protocol = header.get("version")
    if protocol < MIN_PROTOCOL:
        raise BootError(f"{name} uses boot protocol {protocol >> 8}.{protocol & 0xFF:02}; pyhv needs 2.02 or later")
    header_end = 0x202 + image[0x201]
    if len(image) < header_end:
        raise BootError(f"{name} is truncated inside its setup header")
    if not header.get("loadflags") & LOADFLAG_LOADED_HIGH:
        raise BootError(f"{name} is a zImage (loaded below 1 MiB); pyhv boots only bzImages")
    setup_sects = header.get("setup_sects") or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR_SIZE
    if len(image) <= setup_size:
        raise BootError(f"{name} is truncated: {len(image)} bytes, but its setup code alone is {setup_size}")
    if protocol >= PROTOCOL_SYSSIZE:
        expected = setup_size + header.get("syssize") * 16
        if len(image) < expected:
            raise BootError(f"{name} is truncated: {len(image)} bytes, its header says {expected}")
    # Only the header proper is kept: bytes past header_end are setup code, not fields.
    if header_end < HEADER_READ_END:
        header.data[header_end:HEADER_READ_END] = bytes(HEADER_READ_END - header_end)
    return BzImage(bytes(image), header, protocol, setup_size)


def choose_load_address(kernel: BzImage, low_ram_end: int) -> int:
    """pref_address for a relocatable kernel when its init_size fits there, else 1 MiB."""
    if kernel.relocatable and kernel.pref_address > HIMEM_START:
        if kernel.pref_address + kernel.init_size <= low_ram_end:
            return kernel.pref_address
    return HIMEM_START


def footprint_end(kernel: BzImage, load_address: int) -> int:
    """Where the memory the kernel may use to unpack and start ends (the initrd goes above).

    boot.rst: init_size counts from "the kernel runtime start address", which is pref_address
    (LOAD_PHYSICAL_ADDR) whenever the kernel was loaded below it: a non-relocatable kernel always
    runs there, and a relocatable one loaded at 1 MiB still unpacks itself there.
    """
    return max(load_address, kernel.pref_address) + kernel.init_size


def check_footprint(kernel: BzImage, load_address: int, low_ram_end: int, name: str = "the kernel") -> int:
    """The end of the kernel's footprint (`footprint_end`), or BootError when it does not fit below
    `low_ram_end`. Checked whether or not pyhv unpacks the payload itself: the header is the
    kernel's own statement of the memory it needs, and one that cannot be met (an init_size of
    0xffffffff, say) is refused before the vCPU finds out."""
    needed_end = footprint_end(kernel, load_address)
    if needed_end > low_ram_end:
        raise BootError(
            f"guest RAM of {low_ram_end // MiB} MiB is too small for {name}: its init_size "
            f"({kernel.init_size:#x}) needs {-(-needed_end // MiB)} MiB below the 32-bit MMIO hole"
        )
    return needed_end


def load_bzimage(memory: GuestMemory, kernel: BzImage, low_ram_end: int, name: str = "the kernel") -> int:
    """Copy the protected-mode kernel into guest RAM; return its load address."""
    load_address = choose_load_address(kernel, low_ram_end)
    check_footprint(kernel, load_address, low_ram_end, name)
    memory.write(load_address, kernel.kernel)
    log.debug(
        "bzImage protocol %#x: %d bytes at %#x, %s entry",
        kernel.protocol,
        len(kernel.kernel),
        load_address,
        "64-bit" if kernel.has_64bit_entry else "32-bit",
    )
    return load_address
