"""Guest RAM as a list of host mmap regions, each at a guest physical address (GPA).

Works without KVM: devices, loaders and virtqueues are tested against real GuestMemory. The KVM
layer only needs `host_address` of each region to register it as a memory slot.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass, field

from hypervisor.errors import ConfigError, GuestMemoryError

log = logging.getLogger(__name__)

# mmap(2) flags the stdlib does not export on every Python version (Linux x86-64 values,
# include/uapi/asm-generic/mman-common.h and linux/mman.h).
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000
HUGEPAGE_SIZE = 2 * 1024 * 1024
PAGE_SIZE = mmap.PAGESIZE


@dataclass
class MemoryRegion:
    """One contiguous piece of guest RAM backed by one anonymous host mapping."""

    gpa: int
    size: int
    hugepages: bool = False
    # A restored snapshot maps its RAM file copy-on-write (MAP_PRIVATE) instead of anonymous
    # memory: pages are read from the file on first touch and a guest write copies only that
    # page, so the cost does not grow with RAM size and restored VMs share the file's pages.
    backing_fd: int = -1
    backing_offset: int = 0
    _map: mmap.mmap = field(init=False, repr=False)
    _anchor: ctypes.Array = field(init=False, repr=False)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE:
            raise ConfigError(f"memory region size {self.size} is not a positive multiple of {PAGE_SIZE}")
        if self.gpa % PAGE_SIZE:
            raise ConfigError(f"memory region address {self.gpa:#x} is not page aligned")
        if self.backing_fd >= 0:
            try:
                self._map = mmap.mmap(self.backing_fd, self.size, flags=mmap.MAP_PRIVATE,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=self.backing_offset)  # fmt: skip
            except (OSError, ValueError) as error:
                raise ConfigError(f"cannot map the saved guest memory: {error}") from error
            self._anchor = (ctypes.c_char * self.size).from_buffer(self._map)
            return
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if self.hugepages:
            if self.size % HUGEPAGE_SIZE:
                raise ConfigError("hugepage-backed memory must be a multiple of 2 MiB")
            # Without MAP_NORESERVE the kernel reserves the huge pages now, so a host without
            # enough of them fails here with ENOMEM instead of killing us with SIGBUS on first
            # touch (Documentation/admin-guide/mm/hugetlbpage.rst).
            flags |= MAP_HUGETLB
        else:
            flags |= MAP_NORESERVE  # ordinary pages are allocated on first touch anyway
        try:
            self._map = mmap.mmap(-1, self.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            hint = " (reserve them in /proc/sys/vm/nr_hugepages)" if self.hugepages else ""
            what = "huge-page " if self.hugepages else ""
            raise ConfigError(
                f"cannot allocate {self.size // (1024 * 1024)} MiB of {what}guest memory: {error.strerror}{hint}"
            ) from error
        # A ctypes view pins the mapping and tells us its host virtual address for KVM.
        self._anchor = (ctypes.c_char * self.size).from_buffer(self._map)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        return ctypes.addressof(self._anchor)

    def view(self, offset: int, length: int) -> memoryview:
        return memoryview(self._map)[offset : offset + length]

    def close(self) -> None:
        del self._anchor
        self._map.close()


class GuestMemory:
    """Guest physical memory made of non-overlapping regions, sorted by address."""

    def __init__(self, regions: list[tuple[int, int]], hugepages: bool = False, backing_fd: int = -1) -> None:
        """`regions` is a list of (gpa, size) pairs. With `backing_fd`, the regions map that file
        copy-on-write, one after the other from offset 0 (the layout `save_sparse` writes)."""
        self.regions: list[MemoryRegion] = []
        offset = 0
        try:
            for gpa, size in sorted(regions):
                if self.regions and gpa < self.regions[-1].end:
                    raise ConfigError(f"memory region at {gpa:#x} overlaps the one before it")
                self.regions.append(MemoryRegion(gpa, size, hugepages, backing_fd, offset))
                offset += size
        except BaseException:
            self.close()
            raise

    @classmethod
    def flat(cls, size: int, hugepages: bool = False) -> GuestMemory:
        """One region of `size` bytes at GPA 0 (what tests and small guests use)."""
        return cls([(0, size)], hugepages)

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    def _region_for(self, gpa: int, length: int) -> MemoryRegion:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest memory access at {gpa:#x}, length {length}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region
        raise GuestMemoryError(
            f"guest physical range {gpa:#x}+{length:#x} is not inside guest RAM"
        )

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._region_for(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of [gpa, gpa+length); the range must lie in one region."""
        region = self._region_for(gpa, length)
        return region.view(gpa - region.gpa, length)

    def host_address(self, gpa: int, length: int) -> int:
        """The host virtual address of [gpa, gpa+length), which must lie in one region (for C
        helpers that act on guest RAM in place, such as an atomic compare-exchange)."""
        region = self._region_for(gpa, length)
        return region.host_address + (gpa - region.gpa)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(2, "little"))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def save_sparse(self, fd: int, chunk: int = 1 << 20) -> int:
        """Writes every region, one after the other, to `fd` with holes for zero chunks (the
        file must be new and empty); returns the bytes of data written. Zero pages of a guest
        cost no disk, and `GuestMemory(..., backing_fd=fd)` maps the result back."""
        zero = bytes(chunk)
        offset = written = 0
        for region in self.regions:
            view = region.view(0, region.size)
            for start in range(0, region.size, chunk):
                part = view[start : start + chunk]
                if part != (zero if len(part) == chunk else bytes(len(part))):
                    os.pwrite(fd, part, offset + start)
                    written += len(part)
            offset += region.size
        os.ftruncate(fd, offset)  # the holes at the end count too
        return written

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
