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
from typing import TYPE_CHECKING

from hypervisor.block import extents
from hypervisor.errors import ConfigError, GuestMemoryError

if TYPE_CHECKING:
    import hashlib

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

    def copy(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset+length) of this region (clipped at its end)."""
        return self._map[offset : offset + length]

    def close(self) -> None:
        del self._anchor
        self._map.close()


# Saved RAM files are written and hashed in chunks of this size; an all-zero chunk is a hole.
SPARSE_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(SPARSE_CHUNK)


def sparse_file_digest(fd: int, size: int, digest: hashlib._Hash) -> None:
    """Feeds `digest` each non-zero SPARSE_CHUNK of the file with its offset, reading only the
    file's data extents (SEEK_DATA/SEEK_HOLE), so checking a 1 GiB RAM file of which 40 MiB is
    data reads 40 MiB. A changed byte anywhere changes the digest: in a hole it makes that chunk
    data (and non-zero), in data it changes the chunk's bytes."""
    next_chunk = 0  # chunks before this are digested (a chunk may hold several data runs)
    for data_start, length in extents.data_ranges(fd, 0, size):
        chunk_start = max(data_start - data_start % SPARSE_CHUNK, next_chunk)
        while chunk_start < data_start + length:
            part = os.pread(fd, min(SPARSE_CHUNK, size - chunk_start), chunk_start)
            if part != (_ZERO_CHUNK if len(part) == SPARSE_CHUNK else bytes(len(part))):
                digest.update(chunk_start.to_bytes(8, "little"))
                digest.update(part)
            chunk_start += SPARSE_CHUNK
        next_chunk = chunk_start


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

    def save_sparse(self, fd: int, digest: hashlib._Hash | None = None) -> int:
        """Writes every region, one after the other, to `fd` with holes for zero chunks (the
        file must be new and empty); returns the bytes of data written. Zero pages of a guest
        cost no disk, and `GuestMemory(..., backing_fd=fd)` maps the result back. `digest` is
        fed what `sparse_file_digest` reads back: each non-zero chunk's offset and bytes."""
        offset = written = 0
        for region in self.regions:
            for start in range(0, region.size, SPARSE_CHUNK):
                # A bytes copy compares with memcmp; a memoryview compares item by item, 60x
                # slower (2.9 s for 256 MiB here).
                part = region.copy(start, SPARSE_CHUNK)
                if part != (_ZERO_CHUNK if len(part) == SPARSE_CHUNK else bytes(len(part))):
                    os.pwrite(fd, part, offset + start)
                    written += len(part)
                    if digest is not None:
                        digest.update((offset + start).to_bytes(8, "little"))
                        digest.update(part)
            offset += region.size
        os.ftruncate(fd, offset)  # the holes at the end count too
        return written

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
