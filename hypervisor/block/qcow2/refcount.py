"""Refcounts and host cluster allocation (qcow2.rst "Host cluster management").

The refcount table and the refcount blocks are cached in memory; increments happen at once in
memory and reach the disk at the next flush *before* any L2/L1 entry that needs them. Decrements
are queued (`free_later`) and applied only after the L2/L1 change that dropped the reference is
durable, so a crash can leak clusters but never leave a referenced cluster with refcount 0, and a
freed cluster is reused only once the change that freed it is on disk.

Blocks are kept decoded as arrays of ints (any width 1..64 bits); sub-byte widths pack the least
significant bits first ("bit 0 means the least significant bit").

The decoded blocks are a bounded least-recently-used cache (QEMU's refcount cache, docs/qcow2-cache.txt):
a dirty block is written to its cluster before it is dropped, which is the first step of the flush
order above (blocks, sync, table entries, then L2/L1) taken early: the flush still syncs before any
table entry or L2/L1 entry that depends on the block, so early writes only make refcounts reach the
disk sooner, never later. During a MetadataTransaction dirty blocks must stay in memory (their new
values go to copies, not over the old state), so there the cache may overflow until the commit.
"""

from __future__ import annotations

import logging
import sys
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.errors import ImageCorruptError, ImageFormatError

log = logging.getLogger(__name__)

_BIG_ENDIAN_HOST = sys.byteorder == "big"
# QEMU never caches fewer than 4 clusters of refcount blocks (qcow2.h MIN_REFCOUNT_CACHE_SIZE); a
# refcount change can touch the block of the cluster, of a new block and of that block's cluster
# at once, and all of them must stay cached meanwhile.
MIN_CACHED_BLOCKS = 4
# Refcount blocks (counted as stored, one cluster each) kept decoded by default: 16 blocks of
# 64 KiB clusters, each counting 32768 clusters (2 GiB) at 16 bits.
DEFAULT_CACHE_BYTES = 1 << 20
_TYPECODE_BY_BYTES = {1: "B", 2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}


def load_u64_table(raw: bytes) -> array:
    """A big-endian u64 table as a native array('Q')."""
    table = array("Q", raw)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def dump_u64_table(table: array) -> bytes:
    out = array("Q", table)
    if not _BIG_ENDIAN_HOST:
        out.byteswap()
    return out.tobytes()


_SUB_BYTE_TABLES: dict[int, list[bytes]] = {}


def refcount_typecode(refcount_bits: int) -> str:
    """The array type holding one refcount of this width (sub-byte widths use a byte each)."""
    if refcount_bits <= 8:
        return "B"
    return _TYPECODE_BY_BYTES[refcount_bits // 8]


def _sub_byte_table(refcount_bits: int) -> list[bytes]:
    """For widths 1, 2, 4: each byte value -> the refcounts it packs, one byte each."""
    table = _SUB_BYTE_TABLES.get(refcount_bits)
    if table is None:
        per_byte = 8 // refcount_bits
        mask = (1 << refcount_bits) - 1
        table = [bytes((byte >> (refcount_bits * slot)) & mask for slot in range(per_byte)) for byte in range(256)]
        _SUB_BYTE_TABLES[refcount_bits] = table
    return table


def decode_block(block: bytes, refcount_bits: int) -> array[int]:
    """All refcounts of one refcount block (qcow2.rst "refcount_block_entry": sub-byte widths are
    packed from the least significant bit, wider ones big-endian), as an array of
    `refcount_typecode(refcount_bits)`. The one decoder: engine, checker and creator use it."""
    typecode = refcount_typecode(refcount_bits)
    if refcount_bits >= 8:
        values = array(typecode, block)
        if not _BIG_ENDIAN_HOST and refcount_bits > 8:
            values.byteswap()
        return values
    return array(typecode, b"".join(map(_sub_byte_table(refcount_bits).__getitem__, block)))


def encode_block(values: array[int] | list[int], refcount_bits: int, block_size: int) -> bytes:
    """One refcount block of `block_size` bytes holding `values` (the rest zero): the inverse of
    decode_block."""
    if refcount_bits >= 8:
        packed = array(refcount_typecode(refcount_bits), values)
        if not _BIG_ENDIAN_HOST and refcount_bits > 8:
            packed.byteswap()
        return packed.tobytes().ljust(block_size, b"\0")
    # Sub-byte widths, without a Python loop per refcount: each lane (every per_byte-th value)
    # is shifted into place with bytes.translate and the lanes are OR-ed as big integers.
    per_byte = 8 // refcount_bits
    mask = (1 << refcount_bits) - 1
    lanes = bytes(array("B", values)).ljust(block_size * per_byte, b"\0")
    combined = 0
    for slot in range(per_byte):
        shift = refcount_bits * slot
        table = bytes(((value & mask) << shift) & 0xFF for value in range(256))
        combined |= int.from_bytes(lanes[slot::per_byte].translate(table), "big")
    return combined.to_bytes(block_size, "big")


def refcounts_per_block(cluster_size: int, refcount_bits: int) -> int:
    """qcow2.rst "Host cluster management": a refcount block is one cluster of refcount_bits-wide
    entries, i.e. cluster_size * 8 / refcount_bits of them."""
    return cluster_size * 8 // refcount_bits


def blocks_covering(start: int, stop: int, per_block: int) -> range:
    """Indices of the refcount blocks that hold the refcounts of clusters [start, stop)."""
    if stop <= start:
        return range(0)
    return range(start // per_block, (stop - 1) // per_block + 1)


class RefcountStructureSize(NamedTuple):
    """How big a refcount structure is: its refcount blocks and refcount table clusters."""

    blocks: int
    table_clusters: int

    @property
    def clusters(self) -> int:
        return self.blocks + self.table_clusters


def refcount_structure_size(
    first_free: int, cluster_size: int, refcount_bits: int, counted_blocks: Sequence[int] | None = None
) -> RefcountStructureSize:
    """The smallest refcount table + blocks that, stored in the clusters from `first_free` on,
    count every cluster below `first_free` and also their own clusters.

    qcow2.rst "Host cluster management": every host cluster has a refcount, the refcount table and
    blocks included, so the structure must cover itself; a block holds cluster_size * 8 /
    refcount_bits refcounts and the table one 8-byte entry per block index up to the highest one
    in use (a zero entry stands for a block of zeros). This is QEMU's fixed point of
    qcow2_refcount_metadata_size (qcow2-refcount.c calc_refcount_table_size for the table).

    `counted_blocks` are the sorted indices of the blocks needed for the clusters below
    `first_free`; None means all of them (every cluster below `first_free` is in use, as in a new
    or rebuilt image). The structure's own clusters then need blocks_covering(first_free,
    first_free + clusters, per_block) as well. The one sizing rule of the creator and the
    checker's rebuild (which also repairs dirty images when the engine opens them).
    """
    per_block = refcounts_per_block(cluster_size, refcount_bits)
    entries_per_table_cluster = cluster_size // 8  # qcow2.rst: refcount table entries are 64 bits
    counted = range(-(-first_free // per_block)) if counted_blocks is None else counted_blocks
    # Start below the answer (no blocks, the one table cluster every image has) and apply the
    # rule until nothing changes: each step only grows, as more clusters never need fewer blocks,
    # so the first size that describes itself is the smallest one.
    size = RefcountStructureSize(0, 1)
    while True:
        own = blocks_covering(first_free, first_free + size.clusters, per_block)
        shared = bisect_left(counted, own.stop) - bisect_left(counted, own.start)
        highest = max(own[-1], counted[-1]) if counted else own[-1]
        needed = RefcountStructureSize(
            blocks=len(counted) + len(own) - shared,
            table_clusters=-(-(highest + 1) // entries_per_table_cluster),
        )
        if needed == size:
            return size
        size = needed


class RefcountBlockCodec:
    """One image's refcount blocks: `1 << order` bit entries in a cluster (decode_block and
    encode_block with the image's geometry)."""

    def __init__(self, order: int, cluster_size: int) -> None:
        self.order = order
        self.bits = 1 << order
        self.entries = cluster_size * 8 // self.bits
        self.cluster_size = cluster_size
        self.max_value = (1 << self.bits) - 1

    def empty(self) -> array:
        return array(refcount_typecode(self.bits), bytes(max(1, self.bits // 8) * self.entries))

    def decode(self, raw: bytes) -> array:
        return decode_block(raw, self.bits)

    def encode(self, values: array) -> bytes:
        return encode_block(values, self.bits, self.cluster_size)


def cache_capacity(cluster_size: int, cache_bytes: int | None = None) -> int:
    """How many refcount blocks the cache holds: `cache_bytes` (default DEFAULT_CACHE_BYTES) of
    clusters, at least MIN_CACHED_BLOCKS."""
    wanted = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    return max(MIN_CACHED_BLOCKS, wanted // cluster_size)


class Refcounts:
    """The refcount structure of one image, with a first-fit cluster allocator."""

    def __init__(
        self,
        hf: HostFile,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        on_table_moved: Callable[[int, int], None],
        cache_blocks: int | None = None,
    ) -> None:
        self.hf = hf
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.codec = RefcountBlockCodec(refcount_order, self.cluster_size)
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._on_table_moved = on_table_moved
        raw = hf.pread(table_offset, table_clusters * self.cluster_size)
        self.table = list(load_u64_table(raw))
        for index, entry in enumerate(self.table):
            self._check_table_entry(index, entry)
        while self.table and self.table[-1] == 0:
            self.table.pop()
        # Decoded blocks by block index, least recently used first; every dirty block is in it.
        self.blocks: OrderedDict[int, array] = OrderedDict()
        self.cache_capacity = max(MIN_CACHED_BLOCKS, cache_blocks or cache_capacity(self.cluster_size))
        # Set by MetadataTransaction: dirty blocks then stay cached instead of being written over
        # the old state's blocks (see module doc).
        self.keep_dirty_blocks = False
        self.dirty_blocks: set[int] = set()
        self.changed_table_entries: set[int] = set()
        self.table_relocation_needed = False
        self.pending_frees: list[tuple[int, int]] = []  # (first cluster index, count)
        self.free_hint = 0

    # -- lookup ------------------------------------------------------------------------------
    def _check_table_entry(self, index: int, entry: int) -> None:
        if not entry:
            return
        path = self.hf.path
        if entry & fmt.REFT_RESERVED_MASK:
            raise ImageCorruptError(f"{path}: refcount table entry {index} has reserved bits set (0x{entry:x})")
        if entry % self.cluster_size:
            raise ImageCorruptError(f"{path}: refcount block {index} at 0x{entry:x} is not cluster aligned")
        if entry < self.cluster_size:
            raise ImageCorruptError(f"{path}: refcount block {index} points into the header")
        if entry >= self.hf.size:
            raise ImageCorruptError(f"{path}: refcount block {index} at 0x{entry:x} is past the end of the file")

    @property
    def entries_per_block(self) -> int:
        return self.codec.entries

    @property
    def max_refcount(self) -> int:
        return self.codec.max_value

    def block_offsets(self) -> Iterator[int]:
        return (entry for entry in self.table if entry)

    def _block(self, block_index: int) -> array | None:
        block = self.blocks.get(block_index)
        if block is not None:
            self.blocks.move_to_end(block_index)
            return block
        if block_index >= len(self.table) or not self.table[block_index]:
            return None
        raw = self.hf.pread(self.table[block_index], self.cluster_size)
        block = self.codec.decode(raw)
        self._cache(block_index, block)
        return block

    def _cache(self, block_index: int, block: array) -> None:
        """Keep `block` as the most recently used one and drop the least recently used others
        beyond the capacity, writing dirty ones first (never `block_index` itself: the caller is
        about to use it)."""
        self.blocks[block_index] = block
        self.blocks.move_to_end(block_index)
        self._trim(keep=block_index)

    def _trim(self, keep: int | None = None) -> None:
        """Drop least recently used blocks (but `keep`) down to the capacity."""
        excess = len(self.blocks) - self.cache_capacity
        if excess <= 0:
            return
        victims = []
        for index in self.blocks:
            if index == keep or (self.keep_dirty_blocks and index in self.dirty_blocks):
                continue
            victims.append(index)
            if len(victims) == excess:
                break
        # A dirty block is written to its cluster before it is dropped: the same write as at the
        # flush (write_back's first step), only sooner; its table entry, if new, still waits
        # for write_back, which syncs the block before writing the entry.
        self._write_blocks(index for index in victims if index in self.dirty_blocks)
        for index in victims:
            del self.blocks[index]

    def hold_dirty_blocks(self, hold: bool) -> None:
        """While held, dirty blocks stay cached (MetadataTransaction: their new values must go to
        copies at the commit, never over the old state's blocks); the cache may overflow."""
        self.keep_dirty_blocks = hold

    def trim_cache(self) -> None:
        """Give back what the cache holds beyond its capacity (after a transaction's commit)."""
        self._trim()

    def get(self, cluster_index: int) -> int:
        block = self._block(cluster_index // self.codec.entries)
        if block is None:
            return 0
        return block[cluster_index % self.codec.entries]

    # -- changes -----------------------------------------------------------------------------
    def change(self, cluster_index: int, delta: int) -> int:
        """Add `delta` to one cluster's refcount now (in memory). Returns the new value."""
        block_index, slot = divmod(cluster_index, self.codec.entries)
        block = self._block(block_index)
        if block is None:
            if delta < 0:
                raise ImageCorruptError(f"{self.hf.path}: refcount of cluster {cluster_index} would drop below 0")
            self._new_block(block_index)
            # Looked up again: placing the new block touched other blocks of the cache.
            block = self._block(block_index)
            assert block is not None
        value = block[slot] + delta
        if value < 0:
            raise ImageCorruptError(f"{self.hf.path}: refcount of cluster {cluster_index} would drop below 0")
        if value > self.codec.max_value:
            raise ImageFormatError(
                f"{self.hf.path}: refcount of cluster {cluster_index} would exceed {self.codec.max_value} "
                f"(refcount_bits={self.codec.bits})"
            )
        block[slot] = value
        self.dirty_blocks.add(block_index)
        if value == 0 and cluster_index < self.free_hint:
            self.free_hint = cluster_index
        return value

    def _new_block(self, block_index: int) -> array:
        """Create refcount block `block_index` in a free cluster (placing it inside its own range if
        that is where the first free cluster is, as QEMU does)."""
        while True:
            candidate = self._first_free(1, self.free_hint)
            owner = candidate // self.codec.entries
            if owner == block_index or self._block(owner) is not None:
                break
            self._new_block(owner)  # the candidate's own range needs a block first
        block = self.codec.empty()
        while len(self.table) <= block_index:
            self.table.append(0)
        self.table[block_index] = candidate << self.cluster_bits
        self.changed_table_entries.add(block_index)
        self.dirty_blocks.add(block_index)
        self._cache(block_index, block)
        if len(self.table) > self.table_clusters * self.cluster_size // 8:
            self.table_relocation_needed = True
        self.change(candidate, +1)
        return block

    def _first_free(self, count: int, start: int) -> int:
        """First run of `count` free clusters at or after `start`; also moves the free hint up to
        the first free cluster seen (everything before it is in use)."""
        entries = self.codec.entries
        index = max(start, 1)
        run_start, run = index, 0
        first_seen = -1
        while run < count:
            block = self._block(index // entries)
            if block is None:
                # a whole unallocated block range is free
                step = entries - index % entries
                if run == 0:
                    run_start = index
                if first_seen < 0:
                    first_seen = index
                run += step
                index += step
                continue
            if block[index % entries] == 0:
                if run == 0:
                    run_start = index
                if first_seen < 0:
                    first_seen = index
                run += 1
            else:
                run = 0
            index += 1
        if start <= self.free_hint:
            self.free_hint = first_seen
        return run_start

    def allocate(self, count: int) -> int:
        """Allocate `count` contiguous clusters (refcount 1). Returns the host byte offset."""
        entries = self.codec.entries
        while True:
            start = self._first_free(count, self.free_hint)
            missing = next(
                (b for b in range(start // entries, (start + count - 1) // entries + 1) if self._block(b) is None),
                None,
            )
            if missing is None:
                break
            self._new_block(missing)  # may take a cluster of the run: search again
        for i in range(count):
            self.change(start + i, +1)
        if start == self.free_hint:
            self.free_hint = start + count
        return start << self.cluster_bits

    def free_later(self, host_offset: int, count: int = 1) -> None:
        """Queue a decrement for `count` clusters from `host_offset`; applied after the next durable
        metadata update (see module doc)."""
        self.pending_frees.append((host_offset >> self.cluster_bits, count))

    # -- flush -------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.changed_table_entries or self.table_relocation_needed)

    def write_back(self) -> None:
        """Make the in-memory refcounts durable: blocks, sync, then table entries / a moved table."""
        if not self.dirty:
            return
        if self.table_relocation_needed:
            self._relocate_table()
        new_blocks = bool(self.changed_table_entries)
        self._write_blocks()
        if new_blocks:
            self.hf.sync()
            if self.table_relocation_needed:
                self._write_whole_table()
                self.hf.sync()
                old_offset, old_clusters = self.table_offset, self.table_clusters
                self.table_offset, self.table_clusters = self._new_table
                self._on_table_moved(self.table_offset, self.table_clusters)
                self.table_relocation_needed = False
                self.free_later(old_offset, old_clusters)
            else:
                self._write_table_entries_in_order()
            self.changed_table_entries.clear()
        self.hf.sync()

    def _write_table_entries_in_order(self) -> None:
        """Write new table entries so that a block whose own cluster is counted by another new
        block becomes reachable only after that block is (sync in between): otherwise a crash
        could leave a reachable refcount block whose cluster has refcount 0."""
        pending = set(self.changed_table_entries)
        entries = self.codec.entries
        while pending:
            ready = {i for i in pending if ((self.table[i] >> self.cluster_bits) // entries) not in pending - {i}}
            if not ready:  # blocks counting each other: cannot happen with first-fit placement
                ready = set(pending)
            for index in sorted(ready):
                self.hf.pwrite(self.table_offset + 8 * index, self.table[index].to_bytes(8, "big"))
            pending -= ready
            if pending:
                self.hf.sync()

    def _write_blocks(self, indices: Iterable[int] | None = None) -> None:
        """Write dirty blocks (`indices`, default all of them) to their clusters; caller syncs."""
        for block_index in sorted(self.dirty_blocks if indices is None else indices):
            self.hf.pwrite(self.table[block_index], self.codec.encode(self.blocks[block_index]))
            self.dirty_blocks.discard(block_index)

    def _relocate_table(self) -> None:
        """Allocate a bigger refcount table; its own clusters may need new blocks, hence the loop."""
        while True:
            needed = len(self.table) + 1
            clusters = max(self.table_clusters + 1, -(-needed * 8 * 3 // 2 // self.cluster_size))
            offset = self.allocate(clusters)
            if len(self.table) <= clusters * self.cluster_size // 8:
                self._new_table = (offset, clusters)
                return
            for i in range(clusters):  # did not fit after all: give the clusters back, grow more
                self.change((offset >> self.cluster_bits) + i, -1)

    def _write_whole_table(self) -> None:
        offset, clusters = self._new_table
        words = array("Q", self.table)
        words.extend([0] * (clusters * self.cluster_size // 8 - len(words)))
        self.hf.pwrite(offset, dump_u64_table(words))

    def apply_pending_frees(self) -> bool:
        """Apply queued decrements in memory and write them (caller syncs). True if any."""
        if not self.pending_frees:
            return False
        frees, self.pending_frees = self.pending_frees, []
        for first, count in frees:
            for cluster_index in range(first, first + count):
                self.change(cluster_index, -1)
        self._write_blocks()
        return True

    def table_clusters_range(self) -> tuple[int, int]:
        return self.table_offset, self.table_clusters
