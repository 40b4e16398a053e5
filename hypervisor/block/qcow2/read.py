"""The qcow2 read path and the allocation map (qcow2.rst "Cluster mapping", "Extended L2 Entries").

A request is cut into segments of one kind (data, zeros, backing, compressed); neighbouring data
clusters that are contiguous in the file merge into one segment, read with a single preadv
straight into the caller's buffers. Entries are validated when met: corruption is an error,
never silently zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hypervisor.block import extents, fileio
from hypervisor.block.capabilities import HostFile
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.compress import decompress
from hypervisor.block.qcow2.state import ImageState
from hypervisor.block.qcow2.types import EXTENT_DATA, EXTENT_UNALLOCATED, EXTENT_ZERO, Extent
from hypervisor.errors import ImageCorruptError, ImageError

SEG_DATA = 0
SEG_ZERO = 1
SEG_BACKING = 2  # unallocated: backing file, or zeros (also past the backing file's end)
SEG_COMPRESSED = 3

_SUBCLUSTER_ALL = fmt.SUBCLUSTER_ALLOC_MASK
# Any of these bits means "not a plain data cluster": classify the entry the slow way.
_NOT_PLAIN_DATA = fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO | fmt.L2E_STD_RESERVED_MASK


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


class ReadMixin(ImageState):
    """readinto / map_extents for Qcow2Image (shared state declared in state.py)."""

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = fileio.as_byte_views(buffers)
        length = sum(view.nbytes for view in views)
        if offset < 0 or offset + length > self._size:
            raise ValueError(f"{self.path}: read [{offset}, +{length}) outside the disk ({self._size} bytes)")
        with self._lock:
            self._check_open()
            self._read_views(offset, views, length)

    def _read_views(self, offset: int, views: list[memoryview], length: int) -> None:
        cursor = ViewCursor(views)
        for seg_start, seg_len, kind, host in self._segments(offset, length):
            dst = cursor.take(seg_len)
            if kind == SEG_DATA:
                if self._has_data_file:
                    if self._data is None:
                        raise ImageError(f"{self.path}: external data file not opened (not allowed)")
                    self._data.preadv(host, dst)
                else:
                    self._hf.preadv(host, dst)
            elif kind == SEG_ZERO:
                zero_views(dst)
            elif kind == SEG_BACKING:
                self._read_backing(seg_start, seg_len, dst)
            else:
                data = self._decompress_cluster(host)
                start = seg_start & (self._cs - 1)
                pos = start
                for view in dst:
                    view[:] = data[pos : pos + view.nbytes]
                    pos += view.nbytes

    def _read_backing(self, offset: int, length: int, dst: list[memoryview]) -> None:
        backing = self._backing
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
        host, n = fmt.compressed_span(entry, self._cb)
        data = decompress(self._hf.pread(host, n), self._cs, self._header.compression_type, self.path)
        self._decompressed = (entry, data)
        return data

    # -- classification ----------------------------------------------------------------------
    def _entry_words(self, guest_cluster: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of a guest cluster; (0, 0) if it has no L2 table."""
        table = self._l2_table(guest_cluster >> self._l2_bits)
        if table is None:
            return 0, 0
        index = (guest_cluster & self._l2_mask) << self._ext_shift
        if self._extl2:
            return table[index], table[index + 1]
        return table[index], 0

    def _classify(self, entry: int, guest_cluster: int) -> tuple[int, int]:
        """(kind, host offset or compressed entry) of a whole-cluster entry (no subclusters)."""
        if entry == 0:
            return SEG_BACKING, 0
        if entry & fmt.OFLAG_COMPRESSED:
            self._check_compressed(entry, guest_cluster)
            return SEG_COMPRESSED, entry
        if entry & fmt.L2E_STD_RESERVED_MASK:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} has reserved bits set (0x{entry:x})"
            )
        if entry & fmt.OFLAG_ZERO:
            if not self._v3:
                raise ImageCorruptError(f"{self.path}: zero flag in a version 2 image (guest cluster {guest_cluster})")
            if self._extl2:
                raise ImageCorruptError(
                    f"{self.path}: bit 0 set in an extended L2 entry (guest cluster {guest_cluster})"
                )
            return SEG_ZERO, 0
        host = entry & fmt.L2E_OFFSET_MASK
        if not host and not self._has_data_file:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} has no offset (0x{entry:x})"
            )
        self._check_data_offset(host, guest_cluster, entry)
        return SEG_DATA, host

    def _check_compressed(self, entry: int, guest_cluster: int) -> None:
        if self._has_data_file:
            raise ImageCorruptError(f"{self.path}: compressed cluster in an image with an external data file")
        host, n = fmt.compressed_span(entry, self._cb)
        if host < self._cs or host >= self._hf.size:
            raise ImageCorruptError(
                f"{self.path}: compressed cluster for guest cluster {guest_cluster} at 0x{host:x} is outside the file"
            )
        if host >> self._cb in self._metadata:
            raise ImageCorruptError(f"{self.path}: compressed cluster at 0x{host:x} overlaps metadata")

    def _cluster_pieces(self, guest_cluster: int, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(length, kind, host) pieces of [start, start+length) inside one guest cluster."""
        entry, bitmap = self._entry_words(guest_cluster)
        if not self._extl2:
            kind, host = self._classify(entry, guest_cluster)
            yield length, kind, (host + start if kind == SEG_DATA else host)
            return
        if entry & fmt.OFLAG_COMPRESSED:
            if bitmap:
                raise ImageCorruptError(f"{self.path}: compressed cluster {guest_cluster} has a subcluster bitmap")
            self._check_compressed(entry, guest_cluster)
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
            if not host and not self._has_data_file:
                raise ImageCorruptError(f"{self.path}: allocated subclusters without a host cluster ({guest_cluster})")
            self._check_data_offset(host, guest_cluster, entry)
        sc_bits = self._sc_bits
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

    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(guest offset, length, kind, host) runs covering [offset, offset+length), merged."""
        if not self._extl2 and not self._has_data_file:
            return self._standard_segments(offset, length)
        return self._generic_segments(offset, length)

    def _standard_segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """The hot path of `_segments` for ordinary images: one inlined loop per cluster, plain data
        clusters validated inline (aligned, inside the file, not metadata), the rest classified."""
        cb, cs = self._cb, self._cs
        in_mask = cs - 1
        l2_bits, l2_mask = self._l2_bits, self._l2_mask
        not_plain = _NOT_PLAIN_DATA
        file_size, metadata = self._hf.size, self._metadata
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
                table = self._l2_table(l1_index)
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
        cb, cs = self._cb, self._cs
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
    def map_extents(self) -> Iterator[Extent]:
        """The allocation state of the whole disk through the backing chain, merged like qemu-img map."""
        with self._lock:
            self._check_open()
            runs = list(self._extents(0, self._size, 0))
        return iter(_merge_extents(runs))

    def _extents(self, start: int, end: int, depth: int) -> Iterator[Extent]:
        bytes_per_l2 = self._l2_entries << self._cb
        pos = start
        while pos < end:
            if self._l2_table(pos >> self._cb >> self._l2_bits) is None:
                stop = min(end, (pos // bytes_per_l2 + 1) * bytes_per_l2)
                yield from self._unallocated_extents(pos, stop, depth)
                pos = stop
                continue
            for seg_start, seg_len, kind, host in self._segments(
                pos, min(end - pos, bytes_per_l2 - pos % bytes_per_l2)
            ):
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
        backing = self._backing
        if backing is None:
            yield Extent(start, end - start, EXTENT_UNALLOCATED, None, False, depth)
            return
        inside_end = min(end, backing.size)
        if start < inside_end:
            backing_extents = getattr(backing, "_extents", None)
            if backing_extents is not None:
                with backing._lock:  # type: ignore[attr-defined]
                    yield from backing_extents(start, inside_end, depth + 1)
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


def _merge_extents(runs: list[Extent]) -> list[Extent]:
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
