"""Stored refcounts for `pyhv image check`: read them, lower leaked ones, write a new structure.

qcow2.rst "Host cluster management": refcount table entries (bits 9-63 offset, bits 0-8 reserved)
point at refcount blocks of one cluster each; a block holds cluster_size * 8 / refcount_bits
entries. Widths below 8 bits are packed from the least significant bit of each byte (QEMU's
get_refcount_ro0..2), wider ones are big-endian integers.

Blocks are decoded into arrays of the same type as `ExpectedCounts` spans, so comparing a block
with what the walk counted is one C-level array comparison; all-zero blocks are never decoded.
"""

from __future__ import annotations

import os
import struct
from array import array

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.check_walk import ExpectedCounts, ImageFile, ReferenceCounter
from hypervisor.block.qcow2.refcount import blocks_covering, decode_block, encode_block, refcount_structure_size
from hypervisor.errors import ImageCorruptError


class RefcountReader:
    """The refcounts the image stores, block by block, with in-place updates for leak repair."""

    def __init__(self, image: ImageFile, messages: list[str]) -> None:
        self.image = image
        self.messages = messages
        self.corruptions = 0
        header = image.header
        cs = image.cluster_size
        self.bits = header.refcount_bits
        self.per_block = cs * 8 // self.bits
        table_bytes = header.refcount_table_clusters * cs
        raw = image.pread(table_bytes, header.refcount_table_offset)
        self.block_offsets: list[int] = []
        # Table entries naming an unaligned block: QEMU cannot read a refcount there ("Can't get
        # refcount for cluster N", one check error per cluster of the block compared).
        self.unreadable: set[int] = set()
        # Only a rebuild of the refcount structure repairs the entry (QEMU sets `rebuild`).
        self.needs_rebuild = False
        for index, entry in enumerate(struct.unpack(f">{table_bytes // 8}Q", raw)):
            offset = entry & fmt.REFT_OFFSET_MASK
            if entry & fmt.REFT_RESERVED_MASK:
                # QEMU's check_refblocks words; like QEMU, the offset bits are still used to read.
                self._corrupt(f"ERROR refcount table entry {index} has reserved bits set")
                self.needs_rebuild = True
            if offset & (cs - 1):
                self._corrupt(f"ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted")
                self.unreadable.add(index)
                self.needs_rebuild = True
                offset = 0
            elif offset and offset + cs > image.file_size:
                self._corrupt(f"ERROR refcount block {index} is outside image")
                self.needs_rebuild = True
                if offset >= 1 << 63:
                    # Not a file offset at all (QEMU's int64_t): qemu-img cannot read it either.
                    self.unreadable.add(index)
                offset = 0
            self.block_offsets.append(offset)
        # Decoded blocks keyed by file offset: table entries naming the same cluster share one
        # array (a hostile table can name one block a million times). None = all zeros.
        self._blocks: dict[int, array[int] | None] = {}

    def _corrupt(self, message: str) -> None:
        self.messages.append(message)
        self.corruptions += 1

    def populated_blocks(self) -> list[int]:
        """Indices of the refcount table entries that name a usable block."""
        return [index for index, offset in enumerate(self.block_offsets) if offset]

    def readable(self, cluster_index: int) -> bool:
        """False where the refcount table names an unaligned block (the refcount is unknown)."""
        return cluster_index // self.per_block not in self.unreadable

    def block(self, block_index: int) -> array[int] | None:
        """The decoded refcount block `block_index`, or None if absent or all zeros."""
        if block_index >= len(self.block_offsets) or not self.block_offsets[block_index]:
            return None
        offset = self.block_offsets[block_index]
        if offset not in self._blocks:
            raw = self.image.pread(self.image.cluster_size, offset)
            self._blocks[offset] = None if raw.count(0) == len(raw) else decode_block(raw, self.bits)
        return self._blocks[offset]

    def get(self, cluster_index: int) -> int:
        block = self.block(cluster_index // self.per_block)
        return block[cluster_index % self.per_block] if block is not None else 0

    def store_block(self, block_index: int, values: array[int]) -> None:
        """Write a whole corrected block in place (leak repair only lowers values, so any mix
        of old and new bytes after a torn write is still a safe over-count)."""
        offset = self.block_offsets[block_index]
        self._blocks[offset] = values
        os.pwrite(self.image.fd, encode_block(values, self.bits, self.image.cluster_size), offset)


def _highest_cluster_in_use(image: ImageFile, counts: ExpectedCounts) -> int:
    """One past every referenced cluster and every cluster of the old refcount structure."""
    cs_bits = image.cluster_bits
    header = image.header
    end = counts.end
    table_end = header.refcount_table_offset + header.refcount_table_clusters * image.cluster_size
    end = max(end, -(-table_end >> cs_bits) if table_end else 0)
    raw = image.pread(header.refcount_table_clusters * image.cluster_size, header.refcount_table_offset)
    for entry in struct.unpack(f">{len(raw) // 8}Q", raw):
        block = entry & fmt.REFT_OFFSET_MASK
        if block and block < image.file_size:
            end = max(end, (block >> cs_bits) + 1)
    return end


def write_refcount_structure(image: ImageFile, counter: ReferenceCounter) -> tuple[int, int]:
    """Write a complete new refcount table and blocks after every cluster in use; flush them.

    Returns (table offset, table clusters) for the caller to put into the header. The new
    structures count themselves; the old ones end up with refcount 0 (free). They go after the
    last cluster in use (not after the end of the file, which may be a huge hole) and after the
    old structure, so nothing the old header still points at is overwritten before the switch.
    Only refcount blocks with a non-zero refcount are written (a table entry of 0 means "all
    zero", qcow2.rst "Host cluster management"), so a far-away cluster in use costs one block,
    not every block up to it.
    """
    cs = image.cluster_size
    bits = image.header.refcount_bits
    counts = counter.counts
    per_block = counts.per_block
    first_free = _highest_cluster_in_use(image, counts)
    referenced = sorted(index for index, span in counts.spans.items() if span.count(0) != len(span))
    size = refcount_structure_size(first_free, cs, bits, referenced)
    if size.table_clusters * cs > fmt.MAX_REFCOUNT_TABLE_BYTES:
        raise ImageCorruptError(f"{image.path}: rebuilt refcount table would be too large")
    n_blocks, table_clusters = size.blocks, size.table_clusters
    end = first_free + size.clusters
    blocks = sorted(set(referenced).union(blocks_covering(first_free, end, per_block)))
    assert len(blocks) == n_blocks
    own = range(first_free, end)
    table = bytearray(table_clusters * cs)
    for position, block_index in enumerate(blocks):
        block_offset = (first_free + position) * cs
        base = block_index * per_block
        span = counts.span(block_index)
        values = array(counts.typecode, span if span is not None else bytes(per_block * counts.itemsize))
        for cluster in range(max(base, own.start), min(base + per_block, own.stop)):
            values[cluster - base] = 1
        os.pwrite(image.fd, encode_block(values, bits, cs), block_offset)
        struct.pack_into(">Q", table, block_index * 8, block_offset)
    table_offset = (first_free + n_blocks) * cs
    os.pwrite(image.fd, bytes(table), table_offset)
    os.fdatasync(image.fd)
    image.file_size = max(image.file_size, end * cs)
    return table_offset, table_clusters
