"""The qcow2 write path: in-place writes, allocating writes with copy-on-write, zeroing, discard.

Rules from qcow2.rst: a cluster may be written in place only if its refcount is exactly one
(COPIED flag, "1 for standard clusters whose refcount is exactly one"); otherwise (unallocated,
zero, compressed, shared with a snapshot) a new cluster is allocated, the parts of it the request
does not cover are filled with the current guest content (backing file, zeros, decompressed or
shared data: copy-on-write), and the old cluster's reference is dropped with a *deferred*
decrement. Data reaches the file at once; the L2/L1 entries and refcounts stay in the caches until
flush, which writes them in a crash-safe order (image.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from hypervisor.block import fileio
from hypervisor.block.qcow2 import bitmaps
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.read import ViewCursor
from hypervisor.block.qcow2.state import ImageState
from hypervisor.errors import ImageError

_ALL_SUBCLUSTERS = fmt.SUBCLUSTER_ALLOC_MASK


class WriteMixin(ImageState):
    """write / write_zeroes / discard for Qcow2Image (shared state declared in state.py)."""

    def _check_writable(self, offset: int, length: int) -> None:
        self._check_open()
        if self._read_only:
            raise ImageError(f"{self.path}: image is open read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"{self.path}: request [{offset}, +{length}) outside the disk ({self._size} bytes)")
        if self._has_data_file and self._data is None:
            raise ImageError(f"{self.path}: external data file not opened (not allowed)")
        if not self._prepared_for_write:
            self._prepare_first_write()

    def _prepare_first_write(self) -> None:
        """Before the first change: bitmaps marked in use and unknown autoclear bits cleared (both
        durable), as qcow2.rst requires of a writer that does not maintain them."""
        hdr = self._header
        changed = False
        if self._bitmaps is not None and bitmaps.mark_all_in_use(self._hf, self._bitmaps):
            changed = True
        unknown_autoclear = hdr.autoclear_features & ~fmt.AUTOCLEAR_KNOWN
        if unknown_autoclear:
            hdr.autoclear_features &= ~unknown_autoclear
            self._write_header()
            changed = True
        if changed:
            self._hf.sync()
        self._prepared_for_write = True

    # -- write -------------------------------------------------------------------------------
    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        views = fileio.as_byte_views(buffers)
        length = sum(view.nbytes for view in views)
        with self._lock:
            self._check_writable(offset, length)
            self._write_views(offset, views, length)
            if self._l2.needs_flush:
                self._flush_metadata()

    def _write_views(self, offset: int, views: list[memoryview], length: int) -> None:
        cb, cs = self._cb, self._cs
        source = ViewCursor(views)
        runs: list[list] = []  # [host offset, buffers, byte length], merged when contiguous
        updates: list[tuple[array, int, int, int]] = []  # (table, index, entry, bitmap)
        frees: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        batchable = not self._extl2 and not self._has_data_file
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
        # `_data` is set only for an image with an external data file (and _check_writable refused one
        # whose data file is not open), so this picks the data file exactly when there is one.
        target = self._data if self._data is not None else self._hf
        for host, buffers, _size in runs:
            target.pwritev(host, buffers)
        for table, index, entry, bitmap in updates:
            table[index] = entry
            if self._extl2:
                table[index + 1] = bitmap
        for host, count in frees:
            self._refs.free_later(host, count)

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
        table, index = self._l2_for_write(guest_cluster)
        limit = min(max_count, self._l2_entries - (guest_cluster & self._l2_mask))
        count = 0
        while count < limit and table[index + count] in (0, fmt.OFLAG_ZERO):
            count += 1
        if not count:
            return 0
        cs = self._cs
        host = self._refs.allocate(count)
        metadata = self._metadata
        for i in range(count):
            metadata.discard((host >> self._cb) + i)
            updates.append((table, index + i, (host + i * cs) | fmt.OFLAG_COPIED, 0))
        self._l2.mark_dirty(self._l1[guest_cluster >> self._l2_bits] & fmt.L1E_OFFSET_MASK)
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
        cs = self._cs
        entry, bitmap = self._entry_words(guest_cluster)
        host = entry & fmt.L2E_OFFSET_MASK
        compressed = bool(entry & fmt.OFLAG_COMPRESSED)
        if self._has_data_file:
            host = guest_cluster << self._cb
        # Fast path: a normal cluster we own alone is written in place.
        if not self._extl2 and entry & fmt.OFLAG_COPIED and not compressed and not entry & fmt.OFLAG_ZERO:
            self._check_data_offset(host, guest_cluster, entry)
            return [(host + start, data)]
        guest_base = guest_cluster << self._cb
        owned = self._owns_cluster(entry, host, compressed)
        table, index = self._l2_for_write(guest_cluster)
        # A table COW may have changed the words' location, not their values.
        if self._extl2:
            first_sc = start >> self._sc_bits
            last_sc = (start + n - 1) >> self._sc_bits
            touched = ((1 << (last_sc + 1)) - 1) ^ ((1 << first_sc) - 1)
            alloc = bitmap & _ALL_SUBCLUSTERS
            zero = bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT
            if compressed or (host and not owned and alloc):
                write_from, write_to = 0, cs  # relocate all: copy every allocated subcluster
                new_alloc = _ALL_SUBCLUSTERS if compressed else alloc | touched
            else:
                write_from, write_to = first_sc << self._sc_bits, (last_sc + 1) << self._sc_bits
                new_alloc = alloc | touched
            new_bitmap = new_alloc | ((zero & ~touched & ~new_alloc) << fmt.SUBCLUSTER_ZERO_SHIFT)
        else:
            write_from, write_to = 0, cs
            new_bitmap = 0
            if owned and not compressed and entry & fmt.OFLAG_ZERO:
                write_from, write_to = 0, cs  # reuse a preallocated zero cluster: fill it all
        buffers: list = []
        if start > write_from:
            buffers.append(self._read_guest(guest_base + write_from, start - write_from))
        buffers.extend(data)
        if write_to > start + n:
            buffers.append(self._read_guest(guest_base + start + n, write_to - start - n))
        if self._has_data_file:
            new_host = host
        elif owned and not compressed and host:
            new_host = host  # we own it alone: write in place (zero-allocated or subclusters)
        else:
            new_host = self._refs.allocate(1)
            self._note_allocated(new_host)
            if compressed:
                frees.extend(self._compressed_clusters(entry))
            elif host:
                frees.append((host, 1))  # drop this image's reference to the old cluster
        new_entry = new_host | fmt.OFLAG_COPIED
        updates.append((table, index, new_entry, new_bitmap))
        self._l2.mark_dirty(self._l1[guest_cluster >> self._l2_bits] & fmt.L1E_OFFSET_MASK)
        return [(new_host + write_from, buffers)]

    def _owns_cluster(self, entry: int, host: int, compressed: bool) -> bool:
        """True if the entry's host cluster is referenced by the active table alone (refcount 1)."""
        if self._has_data_file:
            return True
        if compressed or not host:
            return False
        if entry & fmt.OFLAG_COPIED:
            return True
        return self._refs.get(host >> self._cb) == 1

    def _compressed_clusters(self, entry: int) -> list[tuple[int, int]]:
        """Host clusters a compressed extent touches; each holds one reference per extent."""
        host, n = fmt.compressed_span(entry, self._cb)
        first = host >> self._cb
        last = (host + n - 1) >> self._cb
        return [(c << self._cb, 1) for c in range(first, last + 1)]

    def _note_allocated(self, host: int) -> None:
        # a fresh data cluster may have been metadata before it was freed
        self._metadata.discard(host >> self._cb)

    def _l2_for_write(self, guest_cluster: int) -> tuple[array, int]:
        """The L2 table for a guest cluster, allocated or copied so the active image owns it."""
        l1_index = guest_cluster >> self._l2_bits
        index = (guest_cluster & self._l2_mask) << self._ext_shift
        if l1_index >= len(self._l1):
            raise ImageError(f"{self.path}: guest cluster {guest_cluster} beyond the L1 table")
        l1_entry = self._l1[l1_index]
        offset = l1_entry & fmt.L1E_OFFSET_MASK
        if offset and l1_entry & fmt.OFLAG_COPIED:
            return self._l2_for_walk(self._l1, l1_index), index
        words = self._cs // 8
        if offset:
            old = self._l2_for_walk(self._l1, l1_index)
            if self._refs.get(offset >> self._cb) == 1:
                self._l1[l1_index] = offset | fmt.OFLAG_COPIED  # flag was stale
                self._l1_dirty = True
                return old, index
            table = array("Q", old)
            step = 1 << self._ext_shift
            for i in range(0, len(table), step):  # copied entries are shared now: no COPIED
                table[i] &= ~fmt.OFLAG_COPIED
            self._refs.free_later(offset, 1)
        else:
            table = array("Q", bytes(8 * words))
        new_offset = self._refs.allocate(1)
        self._metadata.add(new_offset >> self._cb)
        self._l2.install(new_offset, table)
        self._l1[l1_index] = new_offset | fmt.OFLAG_COPIED
        self._l1_dirty = True
        return table, index

    # -- zeroing and discard -----------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            self._check_writable(offset, length)
            self._zero_range(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        """Reads as zeros afterwards (a deterministic choice), clusters freed where possible.

        A version 2 image with a backing file cannot express zero clusters; there discard
        leaves the data alone (allowed: "contents become unspecified").
        """
        with self._lock:
            self._check_writable(offset, length)
            if not self._v3 and self._header.backing_file:
                return
            self._zero_range(offset, length, discard=True)

    def _zero_range(self, offset: int, length: int, discard: bool) -> None:
        granule = self._cs >> 5 if self._extl2 else self._cs
        end = offset + length
        first = -(-offset // granule) * granule
        last = end // granule * granule
        if self._has_data_file or (not self._v3 and self._header.backing_file) or first >= last:
            self._write_zero_bytes(offset, length)
            return
        if first > offset:
            self._write_zero_bytes(offset, first - offset)
        self._zero_granules(first, last)
        if end > last:
            self._write_zero_bytes(last, end - last)
        if self._l2.needs_flush:
            self._flush_metadata()

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        while length > 0:
            n = min(chunk, length)
            self._write_views(offset, [memoryview(bytes(n))], n)
            offset += n
            length -= n

    def _zero_granules(self, start: int, end: int) -> None:
        """Mark whole clusters (subclusters with extended L2) in [start, end) as reading zeros."""
        cb, cs = self._cb, self._cs
        needs_zero_flag = bool(self._header.backing_file)
        pos = start
        while pos < end:
            guest_cluster = pos >> cb
            in_cluster = pos & (cs - 1)
            n = min(cs - in_cluster, end - pos)
            entry, bitmap = self._entry_words(guest_cluster)
            if entry == 0 and bitmap == 0 and not needs_zero_flag:
                pos += n
                continue  # already unallocated, no backing: reads zeros
            whole = n == cs
            table, index = self._l2_for_write(guest_cluster)
            l2_offset = self._l1[guest_cluster >> self._l2_bits] & fmt.L1E_OFFSET_MASK
            if whole:
                self._drop_cluster_reference(entry)
                if self._extl2:
                    table[index] = 0
                    table[index + 1] = (_ALL_SUBCLUSTERS << fmt.SUBCLUSTER_ZERO_SHIFT) if needs_zero_flag else 0
                else:
                    table[index] = fmt.OFLAG_ZERO if needs_zero_flag else 0
            else:  # extended L2, whole subclusters of a partially covered cluster
                if entry & fmt.OFLAG_COMPRESSED:
                    self._write_zero_bytes(pos, n)
                    pos += n
                    continue
                first_sc = in_cluster >> self._sc_bits
                count = n >> self._sc_bits
                mask = ((1 << count) - 1) << first_sc
                alloc = (bitmap & _ALL_SUBCLUSTERS) & ~mask
                zero = (bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT) | mask
                table[index + 1] = alloc | (zero << fmt.SUBCLUSTER_ZERO_SHIFT)
            self._l2.mark_dirty(l2_offset)
            pos += n

    def _drop_cluster_reference(self, entry: int) -> None:
        if entry & fmt.OFLAG_COMPRESSED:
            for host, count in self._compressed_clusters(entry):
                self._refs.free_later(host, count)
            return
        host = entry & fmt.L2E_OFFSET_MASK
        if host:
            self._refs.free_later(host, 1)
