"""The qcow2 read path and the allocation map (qcow2.rst "Cluster mapping", "Extended L2 Entries").

`Reader` works on the image's parts: the geometry, the cluster map (lookup and validation), the
allocator's metadata set (for the inlined validation of the hot loop) and the files.

A request is cut into segments of one kind (data, zeros, backing, compressed); neighbouring data
clusters that are contiguous in the file merge into one segment, read with a single preadv
straight into the caller's buffers. Entries are validated when met: corruption is an error,
never silently zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hypervisor.block import extents
from hypervisor.block.capabilities import HostFile
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.allocator import Allocator
from hypervisor.block.qcow2.clustermap import ClusterMap
from hypervisor.block.qcow2.compress import decompress
from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.header import Qcow2Header
from hypervisor.block.qcow2.hostfile import ImageFiles
from hypervisor.block.qcow2.types import EXTENT_DATA, EXTENT_UNALLOCATED, EXTENT_ZERO, Extent
from hypervisor.errors import ImageCorruptError, ImageError

SEG_DATA = 0
SEG_ZERO = 1
SEG_BACKING = 2  # unallocated: backing file, or zeros (also past the backing file's end)
SEG_COMPRESSED = 3

_SUBCLUSTER_ALL = fmt.SUBCLUSTER_ALLOC_MASK
# Any of these bits means "not a plain data cluster": classify the entry the slow way.


class ViewCursor:
    """Hands out consecutive byte ranges of a list of buffers as sub-views (no copies)."""

    __slots__ = ("views", "index", "pos")

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.index = 0
        self.pos = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        while n:
            view = self.views[self.index]
            avail = view.nbytes - self.pos
            if avail <= n:
                out.append(view[self.pos :] if self.pos else view)
                n -= avail
                self.index += 1
                self.pos = 0
            else:
                out.append(view[self.pos : self.pos + n])
                self.pos += n
                n = 0
        return out


def zero_views(views: Sequence[memoryview]) -> None:
    for view in views:
        view[:] = bytes(view.nbytes)


class Reader:
    """Reads guest content and the allocation map of one image."""

    def __init__(
        self, geometry: Geometry, cmap: ClusterMap, allocator: Allocator, files: ImageFiles, header: Qcow2Header
    ) -> None:
        self._geo = geometry
        self._cmap = cmap
        self._alloc = allocator
        self._files = files
        self._header = header
        self._decompressed: tuple[int, bytes] | None = None  # (compressed L2 entry, its data): last one read

    @property
    def path(self) -> str:
        return self._files.image.path

    def read_views(self, offset: int, views: list[memoryview], length: int) -> None:
        """Guest bytes [offset, offset+length) into `views` (no bounds check: the caller's)."""
        cursor = ViewCursor(views)
        files = self._files
        for seg_start, seg_len, kind, host in self.segments(offset, length):
            dst = cursor.take(seg_len)
            if kind == SEG_DATA:
                if self._geo.has_data_file:
                    if files.data is None:
                        raise ImageError(f"{self.path}: external data file not opened (not allowed)")
                    files.data.preadv(host, dst)
                else:
                    files.image.preadv(host, dst)
            elif kind == SEG_ZERO:
                zero_views(dst)
            elif kind == SEG_BACKING:
                self._read_backing(seg_start, seg_len, dst)
            else:
                data = self._decompress_cluster(host)
                pos = seg_start & (self._geo.cluster_size - 1)
                for view in dst:
                    view[:] = data[pos : pos + view.nbytes]
                    pos += view.nbytes

    def read_guest(self, offset: int, length: int) -> bytes:
        """Current guest content (for copy-on-write); past the virtual end it reads zeros."""
        buf = bytearray(length)
        self.read_views(offset, [memoryview(buf)], length)
        return bytes(buf)

    def _read_backing(self, offset: int, length: int, dst: list[memoryview]) -> None:
        backing = self._files.backing
        if backing is None:
            if self._header.backing_file:
                raise ImageError(f"{self.path}: backing file {self._header.backing_file} not opened (not allowed)")
            zero_views(dst)
            return
        inside = max(0, min(length, backing.size - offset))
        if inside == length:
            backing.readinto(offset, dst)
            return
        cursor = ViewCursor(dst)
        if inside:
            backing.readinto(offset, cursor.take(inside))
        zero_views(cursor.take(length - inside))

    def _decompress_cluster(self, entry: int) -> bytes:
        cached = self._decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        host, n = fmt.compressed_span(entry, self._geo.cluster_bits)
        data = decompress(
            self._files.image.pread(host, n), self._geo.cluster_size, self._header.compression_type, self.path
        )
        self._decompressed = (entry, data)
        return data

    # -- classification ----------------------------------------------------------------------
    def _classify(self, entry: int, guest_cluster: int) -> tuple[int, int]:
        """(kind, host offset or compressed entry) of a whole-cluster entry (no subclusters)."""
        if entry == 0:
            return SEG_BACKING, 0
        if entry & fmt.OFLAG_COMPRESSED:
            self._cmap.check_compressed(entry, guest_cluster)
            return SEG_COMPRESSED, entry
        if entry & fmt.L2E_STD_RESERVED_MASK:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} has reserved bits set (0x{entry:x})"
            )
        geo = self._geo
        if entry & fmt.OFLAG_ZERO:
            if not geo.v3:
                raise ImageCorruptError(f"{self.path}: zero flag in a version 2 image (guest cluster {guest_cluster})")
            if geo.extended_l2:
                raise ImageCorruptError(
                    f"{self.path}: bit 0 set in an extended L2 entry (guest cluster {guest_cluster})"
                )
            return SEG_ZERO, 0
        host = entry & fmt.L2E_OFFSET_MASK
        if not host and not geo.has_data_file:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} has no offset (0x{entry:x})"
            )
        self._cmap.check_data_offset(host, guest_cluster, entry)
        return SEG_DATA, host

    def _cluster_pieces(self, guest_cluster: int, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(length, kind, host) pieces of [start, start+length) inside one guest cluster."""
        entry, bitmap = self._cmap.entry_words(guest_cluster)
        if not self._geo.extended_l2:
            kind, host = self._classify(entry, guest_cluster)
            yield length, kind, (host + start if kind == SEG_DATA else host)
            return
        if entry & fmt.OFLAG_COMPRESSED:
            if bitmap:
                raise ImageCorruptError(f"{self.path}: compressed cluster {guest_cluster} has a subcluster bitmap")
            self._cmap.check_compressed(entry, guest_cluster)
            yield length, SEG_COMPRESSED, entry
            return
        alloc = bitmap & _SUBCLUSTER_ALL
        zero = bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT
        if alloc & zero:
            raise ImageCorruptError(f"{self.path}: subcluster both allocated and zero (guest cluster {guest_cluster})")
        host = 0
        if alloc:
            if entry & (fmt.L2E_STD_RESERVED_MASK | fmt.OFLAG_ZERO):
                raise ImageCorruptError(f"{self.path}: extended L2 entry has reserved bits set (0x{entry:x})")
            host = entry & fmt.L2E_OFFSET_MASK
            if not host and not self._geo.has_data_file:
                raise ImageCorruptError(f"{self.path}: allocated subclusters without a host cluster ({guest_cluster})")
            self._cmap.check_data_offset(host, guest_cluster, entry)
        sc_bits = self._geo.subcluster_bits
        pos, end = start, start + length
        while pos < end:
            sc = pos >> sc_bits
            bit = 1 << sc
            kind = SEG_DATA if alloc & bit else SEG_ZERO if zero & bit else SEG_BACKING
            run_end = min(end, (sc + 1) << sc_bits)
            while run_end < end:  # extend over subclusters of the same kind
                nbit = 1 << (run_end >> sc_bits)
                nkind = SEG_DATA if alloc & nbit else SEG_ZERO if zero & nbit else SEG_BACKING
                if nkind != kind:
                    break
                run_end = min(end, run_end + (1 << sc_bits))
            yield run_end - pos, kind, (host + pos if kind == SEG_DATA else 0)
            pos = run_end

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(guest offset, length, kind, host) runs covering [offset, offset+length), merged."""
        if not self._geo.extended_l2 and not self._geo.has_data_file:
            return self._standard_segments(offset, length)
        return self._generic_segments(offset, length)

    def _standard_segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """The hot path of `segments` for ordinary images: one inlined loop per cluster, plain data
        clusters validated inline (aligned, inside the file, not metadata), the rest classified."""
        geo = self._geo
        cb, cs = geo.cluster_bits, geo.cluster_size
        in_mask = cs - 1
        l2_bits, l2_mask = geo.l2_bits, geo.l2_mask
        not_plain = fmt.L2E_NOT_PLAIN_DATA
        file_size, metadata = self._files.image.size, self._alloc.metadata
        l2_table = self._cmap.l2_table
        end = offset + length
        pos = offset
        cur_kind = -1
        cur_start = cur_len = cur_host = 0
        last_l1 = -1
        table = None
        while pos < end:
            guest_cluster = pos >> cb
            l1_index = guest_cluster >> l2_bits
            if l1_index != last_l1:
                table = l2_table(l1_index)
                last_l1 = l1_index
            entry = table[guest_cluster & l2_mask] if table is not None else 0
            in_cluster = pos & in_mask
            n = min(cs - in_cluster, end - pos)
            host = entry & fmt.L2E_OFFSET_MASK
            if entry & not_plain or not host or host & in_mask or host >= file_size or host >> cb in metadata:
                kind, host = self._classify(entry, guest_cluster)
            else:
                kind = SEG_DATA
            if kind == SEG_DATA:
                host += in_cluster
            if kind == cur_kind and kind != SEG_COMPRESSED and (kind != SEG_DATA or host == cur_host + cur_len):
                cur_len += n
            else:
                if cur_kind >= 0:
                    yield cur_start, cur_len, cur_kind, cur_host
                cur_kind, cur_start, cur_len, cur_host = kind, pos, n, host
            pos += n
        if cur_kind >= 0:
            yield cur_start, cur_len, cur_kind, cur_host

    def _generic_segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        cb, cs = self._geo.cluster_bits, self._geo.cluster_size
        end = offset + length
        pos = offset
        cur_kind = -1
        cur_start = cur_len = cur_host = 0
        while pos < end:
            in_cluster = pos & (cs - 1)
            n = min(cs - in_cluster, end - pos)
            for piece_len, kind, host in self._cluster_pieces(pos >> cb, in_cluster, n):
                if kind == cur_kind and kind != SEG_COMPRESSED and (kind != SEG_DATA or host == cur_host + cur_len):
                    cur_len += piece_len
                else:
                    if cur_kind >= 0:
                        yield cur_start, cur_len, cur_kind, cur_host
                    cur_kind, cur_start, cur_len, cur_host = kind, pos, piece_len, host
                pos += piece_len
        if cur_kind >= 0:
            yield cur_start, cur_len, cur_kind, cur_host

    # -- allocation map ----------------------------------------------------------------------
    def map_extents(self, size: int) -> list[Extent]:
        """The allocation state of a disk of `size` bytes through the backing chain, merged like
        qemu-img map."""
        return merge_extents(list(self.extents(0, size, 0)))

    def extents(self, start: int, end: int, depth: int) -> Iterator[Extent]:
        """Unmerged extents of [start, end), this image being layer `depth` of the chain."""
        geo = self._geo
        bytes_per_l2 = geo.bytes_per_l2
        pos = start
        while pos < end:
            if self._cmap.l2_table(pos >> geo.cluster_bits >> geo.l2_bits) is None:
                stop = min(end, (pos // bytes_per_l2 + 1) * bytes_per_l2)
                yield from self._unallocated_extents(pos, stop, depth)
                pos = stop
                continue
            for seg_start, seg_len, kind, host in self.segments(pos, min(end - pos, bytes_per_l2 - pos % bytes_per_l2)):
                if kind == SEG_DATA:
                    yield Extent(seg_start, seg_len, EXTENT_DATA, host, False, depth)
                elif kind == SEG_ZERO:
                    yield Extent(seg_start, seg_len, EXTENT_ZERO, None, False, depth)
                elif kind == SEG_COMPRESSED:
                    yield Extent(seg_start, seg_len, EXTENT_DATA, None, True, depth)
                else:
                    yield from self._unallocated_extents(seg_start, seg_start + seg_len, depth)
                pos = seg_start + seg_len

    def _unallocated_extents(self, start: int, end: int, depth: int) -> Iterator[Extent]:
        backing = self._files.backing
        if backing is None:
            yield Extent(start, end - start, EXTENT_UNALLOCATED, None, False, depth)
            return
        inside_end = min(end, backing.size)
        if start < inside_end:
            # A qcow2 backing file answers for its own layer (under its own lock), a raw one
            # through SEEK_DATA/SEEK_HOLE.
            layered = getattr(backing, "layer_extents", None)
            if layered is not None:
                yield from layered(start, inside_end, depth + 1)
            else:
                yield from _raw_extents(backing, start, inside_end, depth + 1)
        if inside_end < end:  # past the backing file's end: zeros decided by this layer
            yield Extent(max(start, inside_end), end - max(start, inside_end), EXTENT_UNALLOCATED, None, False, depth)


def _raw_extents(backing: object, start: int, end: int, depth: int) -> Iterator[Extent]:
    """Data and holes of a raw backing file (SEEK_DATA/SEEK_HOLE), as qemu-img map shows them."""
    if not isinstance(backing, HostFile):
        if end > start:
            yield Extent(start, end - start, EXTENT_DATA, start, False, depth)
        return
    for offset, length, is_data in extents.file_extents(backing.fd, start, end):
        yield Extent(offset, length, EXTENT_DATA if is_data else EXTENT_ZERO, offset, False, depth)


def merge_extents(runs: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for ext in runs:
        if merged:
            last = merged[-1]
            if (
                last.kind == ext.kind
                and last.depth == ext.depth
                and last.compressed == ext.compressed
                and last.start + last.length == ext.start
                and (
                    last.host_offset is None
                    and ext.host_offset is None
                    or last.host_offset is not None
                    and ext.host_offset == last.host_offset + last.length
                )
            ):
                merged[-1] = Extent(
                    last.start, last.length + ext.length, last.kind, last.host_offset, last.compressed, last.depth
                )
                continue
        merged.append(ext)
    return merged
