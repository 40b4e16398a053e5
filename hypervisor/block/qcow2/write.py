"""The qcow2 write path: in-place writes, allocating writes with copy-on-write, zeroing, discard.

Rules from qcow2.rst: a cluster may be written in place only if its refcount is exactly one
(COPIED flag, "1 for standard clusters whose refcount is exactly one"); otherwise (unallocated,
zero, compressed, shared with a snapshot) a new cluster is allocated, the parts of it the request
does not cover are filled with the current guest content (backing file, zeros, decompressed or
shared data: copy-on-write), and the old cluster's reference is dropped with a *deferred*
decrement. Data reaches the file at once; the L2/L1 entries and refcounts stay in the caches until
flush, which writes them in a crash-safe order (flush.py).

`Writer` works on the image's parts (geometry, cluster map, allocator, files) and reads the
current content for copy-on-write through the `Reader`.
"""

from __future__ import annotations

from array import array

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.allocator import Allocator
from hypervisor.block.qcow2.clustermap import ClusterMap
from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.header import Qcow2Header
from hypervisor.block.qcow2.hostfile import ImageFiles
from hypervisor.block.qcow2.read import Reader, ViewCursor

_ALL_SUBCLUSTERS = fmt.SUBCLUSTER_ALLOC_MASK


class Writer:
    """Writes guest content of one image: data to the file at once, metadata into the caches."""

    def __init__(
        self,
        geometry: Geometry,
        cmap: ClusterMap,
        allocator: Allocator,
        files: ImageFiles,
        header: Qcow2Header,
        reader: Reader,
    ) -> None:
        self._geo = geometry
        self._cmap = cmap
        self._alloc = allocator
        self._files = files
        self._header = header
        self._reader = reader

    # -- write -------------------------------------------------------------------------------
    def write_views(self, offset: int, views: list[memoryview], length: int) -> None:
        """Guest bytes [offset, offset+length) from `views` (no checks: the caller's)."""
        geo = self._geo
        cb, cs = geo.cluster_bits, geo.cluster_size
        source = ViewCursor(views)
        runs: list[list] = []  # [host offset, buffers, byte length], merged when contiguous
        updates: list[tuple[array, int, int, int]] = []  # (table, index, entry, bitmap)
        frees: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        batchable = not geo.extended_l2 and not geo.has_data_file
        while pos < end:
            in_cluster = pos & (cs - 1)
            if batchable and not in_cluster and end - pos >= 2 * cs:
                count = self._plan_fresh_run(pos >> cb, (end - pos) >> cb, source, runs, updates)
                if count:
                    pos += count << cb
                    continue
            n = min(cs - in_cluster, end - pos)
            data = source.take(n)
            for host, buffers in self._plan_cluster_write(pos >> cb, in_cluster, n, data, updates, frees):
                size = sum(len(b) for b in buffers)
                if runs and runs[-1][0] + runs[-1][2] == host:
                    runs[-1][1].extend(buffers)
                    runs[-1][2] += size
                else:
                    runs.append([host, list(buffers), size])
            pos += n
        # `data` is set only for an image with an external data file (and the facade refuses a
        # write when its data file is not open), so this picks the data file exactly when there is one.
        target = self._files.data if self._files.data is not None else self._files.image
        for host, buffers, _size in runs:
            target.pwritev(host, buffers)
        extl2 = geo.extended_l2
        for table, index, entry, bitmap in updates:
            table[index] = entry
            if extl2:
                table[index + 1] = bitmap
        for host, count in frees:
            self._alloc.free_later(host, count)

    def _plan_fresh_run(
        self,
        guest_cluster: int,
        max_count: int,
        source: ViewCursor,
        runs: list[list],
        updates: list[tuple[array, int, int, int]],
    ) -> int:
        """Fast path for whole unallocated clusters (the allocating-write case): one contiguous
        allocation and one write for the run, no copy-on-write needed. Returns the cluster count."""
        geo = self._geo
        # Look before asking for a writable table: l2_for_write copies a shared table and tells
        # the mapping's watchers of a change, neither of which an in-place write needs.
        if self._cmap.entry_words(guest_cluster)[0] not in (0, fmt.OFLAG_ZERO):
            return 0
        table, index = self._cmap.l2_for_write(guest_cluster)
        limit = min(max_count, geo.l2_entries - (guest_cluster & geo.l2_mask))
        count = 0
        while count < limit and table[index + count] in (0, fmt.OFLAG_ZERO):
            count += 1
        if not count:
            return 0
        cs = geo.cluster_size
        host = self._alloc.allocate_data(count)
        for i in range(count):
            updates.append((table, index + i, (host + i * cs) | fmt.OFLAG_COPIED, 0))
        self._cmap.mark_dirty(guest_cluster)
        buffers = source.take(count * cs)
        if runs and runs[-1][0] + runs[-1][2] == host:
            runs[-1][1].extend(buffers)
            runs[-1][2] += count * cs
        else:
            runs.append([host, buffers, count * cs])
        return count

    def _plan_cluster_write(
        self,
        guest_cluster: int,
        start: int,
        n: int,
        data: list[memoryview],
        updates: list[tuple[array, int, int, int]],
        frees: list[tuple[int, int]],
    ) -> list[tuple[int, list]]:
        """Decide where the bytes of one guest cluster go; returns [(host offset, buffers)]."""
        geo, cmap = self._geo, self._cmap
        cs = geo.cluster_size
        entry, bitmap = cmap.entry_words(guest_cluster)
        host = entry & fmt.L2E_OFFSET_MASK
        compressed = bool(entry & fmt.OFLAG_COMPRESSED)
        if geo.has_data_file:
            host = guest_cluster << geo.cluster_bits
        # Fast path: a normal cluster we own alone is written in place.
        if not geo.extended_l2 and entry & fmt.OFLAG_COPIED and not compressed and not entry & fmt.OFLAG_ZERO:
            cmap.check_data_offset(host, guest_cluster, entry)
            return [(host + start, data)]
        guest_base = guest_cluster << geo.cluster_bits
        owned = self._owns_cluster(entry, host, compressed)
        table, index = cmap.l2_for_write(guest_cluster)
        # A table COW may have changed the words' location, not their values.
        if geo.extended_l2:
            sc_bits = geo.subcluster_bits
            first_sc = start >> sc_bits
            last_sc = (start + n - 1) >> sc_bits
            touched = ((1 << (last_sc + 1)) - 1) ^ ((1 << first_sc) - 1)
            alloc = bitmap & _ALL_SUBCLUSTERS
            zero = bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT
            if compressed or (host and not owned and alloc):
                write_from, write_to = 0, cs  # relocate all: copy every allocated subcluster
                new_alloc = _ALL_SUBCLUSTERS if compressed else alloc | touched
            else:
                write_from, write_to = first_sc << sc_bits, (last_sc + 1) << sc_bits
                new_alloc = alloc | touched
            new_bitmap = new_alloc | ((zero & ~touched & ~new_alloc) << fmt.SUBCLUSTER_ZERO_SHIFT)
        else:
            write_from, write_to = 0, cs  # a whole new or preallocated zero cluster is filled
            new_bitmap = 0
        buffers: list = []
        read_guest = self._reader.read_guest
        if start > write_from:
            buffers.append(read_guest(guest_base + write_from, start - write_from))
        buffers.extend(data)
        if write_to > start + n:
            buffers.append(read_guest(guest_base + start + n, write_to - start - n))
        if geo.has_data_file:
            new_host = host
        elif owned and not compressed and host:
            new_host = host  # we own it alone: write in place (zero-allocated or subclusters)
        else:
            new_host = self._alloc.allocate_data(1)
            if compressed:
                frees.extend(geo.compressed_clusters(entry))
            elif host:
                frees.append((host, 1))  # drop this image's reference to the old cluster
        updates.append((table, index, new_host | fmt.OFLAG_COPIED, new_bitmap))
        cmap.mark_dirty(guest_cluster)
        return [(new_host + write_from, buffers)]

    def _owns_cluster(self, entry: int, host: int, compressed: bool) -> bool:
        """True if the entry's host cluster is referenced by the active table alone (refcount 1)."""
        if self._geo.has_data_file:
            return True
        if compressed or not host:
            return False
        if entry & fmt.OFLAG_COPIED:
            return True
        return self._alloc.refcount(host >> self._geo.cluster_bits) == 1

    # -- zeroing and discard -----------------------------------------------------------------
    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, whole clusters (subclusters with extended
        L2) by their entries and freeing what they pointed to, the rest by writing zeros."""
        geo = self._geo
        granule = geo.cluster_size >> 5 if geo.extended_l2 else geo.cluster_size
        end = offset + length
        first = -(-offset // granule) * granule
        last = end // granule * granule
        if geo.has_data_file or (not geo.v3 and self._header.backing_file) or first >= last:
            self._write_zero_bytes(offset, length)
            return
        if first > offset:
            self._write_zero_bytes(offset, first - offset)
        self._zero_granules(first, last)
        if end > last:
            self._write_zero_bytes(last, end - last)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        while length > 0:
            n = min(chunk, length)
            self.write_views(offset, [memoryview(bytes(n))], n)
            offset += n
            length -= n

    def _zero_granules(self, start: int, end: int) -> None:
        """Mark whole clusters (subclusters with extended L2) in [start, end) as reading zeros."""
        geo, cmap = self._geo, self._cmap
        cb, cs = geo.cluster_bits, geo.cluster_size
        needs_zero_flag = bool(self._header.backing_file)
        pos = start
        while pos < end:
            guest_cluster = pos >> cb
            in_cluster = pos & (cs - 1)
            n = min(cs - in_cluster, end - pos)
            entry, bitmap = cmap.entry_words(guest_cluster)
            if entry == 0 and bitmap == 0 and not needs_zero_flag:
                pos += n
                continue  # already unallocated, no backing: reads zeros
            table, index = cmap.l2_for_write(guest_cluster)
            if n == cs:
                self.drop_cluster_reference(entry)
                if geo.extended_l2:
                    table[index] = 0
                    table[index + 1] = (_ALL_SUBCLUSTERS << fmt.SUBCLUSTER_ZERO_SHIFT) if needs_zero_flag else 0
                else:
                    table[index] = fmt.OFLAG_ZERO if needs_zero_flag else 0
            else:  # extended L2, whole subclusters of a partially covered cluster
                if entry & fmt.OFLAG_COMPRESSED:
                    self._write_zero_bytes(pos, n)
                    pos += n
                    continue
                first_sc = in_cluster >> geo.subcluster_bits
                count = n >> geo.subcluster_bits
                mask = ((1 << count) - 1) << first_sc
                alloc = (bitmap & _ALL_SUBCLUSTERS) & ~mask
                zero = (bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT) | mask
                table[index + 1] = alloc | (zero << fmt.SUBCLUSTER_ZERO_SHIFT)
            cmap.mark_dirty(guest_cluster)
            pos += n

    def drop_cluster_reference(self, entry: int) -> None:
        """Queue the decrement of whatever a (dropped) L2 entry pointed to."""
        if entry & fmt.OFLAG_COMPRESSED:
            for host, count in self._geo.compressed_clusters(entry):
                self._alloc.free_later(host, count)
            return
        host = entry & fmt.L2E_OFFSET_MASK
        if host:
            self._alloc.free_later(host, 1)

    def clear_entry(self, guest_cluster: int) -> None:
        """Unmap one guest cluster (shrinking): its entry and bitmap become 0."""
        if self._cmap.l2_table(guest_cluster >> self._geo.l2_bits) is None:
            return
        entry, _ = self._cmap.entry_words(guest_cluster)
        if entry or self._geo.extended_l2:
            table, index = self._cmap.l2_for_write(guest_cluster)
            self.drop_cluster_reference(entry)
            table[index] = 0
            if self._geo.extended_l2:
                table[index + 1] = 0
            self._cmap.mark_dirty(guest_cluster)

    # -- compressed writes -------------------------------------------------------------------
    def write_compressed_cluster(self, guest_cluster: int, packed: bytes) -> None:
        """Store compressed data for an unallocated guest cluster (the caller checked)."""
        host = self._alloc.allocate_compressed(len(packed))
        self._files.image.pwrite(host, packed)
        table, index = self._cmap.l2_for_write(guest_cluster)
        table[index] = fmt.compressed_entry(host, len(packed), self._geo.cluster_bits)
        if self._geo.extended_l2:
            table[index + 1] = 0
        self._cmap.mark_dirty(guest_cluster)
