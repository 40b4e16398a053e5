"""Stored refcounts for `pyhv image check`: read them, lower leaked ones, write a new structure.

qcow2.rst "Host cluster management": refcount table entries (bits 9-63) point at refcount blocks
of one cluster each; a block holds cluster_size * 8 / refcount_bits entries. Widths below 8 bits
are packed from the least significant bit of each byte (QEMU's get_refcount_ro0..2), wider ones
are big-endian integers.
"""

from __future__ import annotations

import os
import struct

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.check_walk import ImageFile, ReferenceCounter
from hypervisor.errors import ImageCorruptError


def decode_block(block: bytes, refcount_bits: int) -> list[int]:
    """All refcounts of one refcount block."""
    if refcount_bits >= 8:
        width = refcount_bits // 8
        code = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
        return list(struct.unpack(f">{len(block) // width}{code}", block))
    per_byte = 8 // refcount_bits
    mask = (1 << refcount_bits) - 1
    return [(byte >> (refcount_bits * slot)) & mask for byte in block for slot in range(per_byte)]


def encode_block(values: list[int], refcount_bits: int, block_size: int) -> bytes:
    """One refcount block holding `values` (the rest zero)."""
    out = bytearray(block_size)
    if refcount_bits >= 8:
        width = refcount_bits // 8
        for index, value in enumerate(values):
            if value:
                out[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return bytes(out)
    per_byte = 8 // refcount_bits
    for index, value in enumerate(values):
        if value:
            out[index // per_byte] |= value << (refcount_bits * (index % per_byte))
    return bytes(out)


class RefcountReader:
    """The refcounts the image stores, block by block, with in-place updates for leak repair."""

    def __init__(self, image: ImageFile, messages: list[str]) -> None:
        self.image = image
        self.messages = messages
        self.corruptions = 0
        header = image.header
        self.bits = header.refcount_bits
        self.per_block = image.cluster_size * 8 // self.bits
        table_bytes = header.refcount_table_clusters * image.cluster_size
        raw = image.pread(table_bytes, header.refcount_table_offset)
        self.block_offsets: list[int] = []
        for index, entry in enumerate(struct.unpack(f">{table_bytes // 8}Q", raw)):
            offset = entry & fmt.REFT_OFFSET_MASK
            if offset & (image.cluster_size - 1):
                self._corrupt(f"ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted")
                offset = 0
            elif offset and offset + image.cluster_size > image.file_size:
                self._corrupt(f"ERROR refcount block {index} is outside image")
                offset = 0
            self.block_offsets.append(offset)
        self._blocks: dict[int, list[int]] = {}

    def _corrupt(self, message: str) -> None:
        self.messages.append(message)
        self.corruptions += 1

    def _block(self, block_index: int) -> list[int] | None:
        if block_index >= len(self.block_offsets) or not self.block_offsets[block_index]:
            return None
        if block_index not in self._blocks:
            raw = self.image.pread(self.image.cluster_size, self.block_offsets[block_index])
            self._blocks[block_index] = decode_block(raw, self.bits)
        return self._blocks[block_index]

    def get(self, cluster_index: int) -> int:
        block = self._block(cluster_index // self.per_block)
        return block[cluster_index % self.per_block] if block is not None else 0

    def set(self, cluster_index: int, value: int) -> bool:
        """Store one refcount in place; False if its refcount block does not exist."""
        block_index, slot = divmod(cluster_index, self.per_block)
        block = self._block(block_index)
        if block is None:
            return False
        block[slot] = value
        base = self.block_offsets[block_index]
        if self.bits >= 8:
            width = self.bits // 8
            os.pwrite(self.image.fd, value.to_bytes(width, "big"), base + slot * width)
        else:
            per_byte = 8 // self.bits
            first = slot - slot % per_byte
            byte = 0
            for i in range(per_byte):
                byte |= block[first + i] << (self.bits * i)
            os.pwrite(self.image.fd, bytes([byte]), base + slot // per_byte)
        return True


def write_refcount_structure(image: ImageFile, counter: ReferenceCounter) -> tuple[int, int]:
    """Write a complete new refcount table and blocks after every cluster in use; flush them.

    Returns (table offset, table clusters) for the caller to put into the header. The new
    structures count themselves; the old ones end up with refcount 0 (free).
    """
    cs = image.cluster_size
    bits = image.header.refcount_bits
    per_block = cs * 8 // bits
    maximum = (1 << bits) - 1
    counts = list(counter.counts)
    for index, value in enumerate(counts):
        if value > maximum:
            raise ImageCorruptError(
                f"{image.path}: cluster {index} has {value} references, more than a {bits}-bit refcount can hold"
            )
    first_free = max(len(counts), -(-image.file_size // cs))
    blocks, table_clusters = 1, 1
    while True:  # the new structure must cover itself
        end = first_free + blocks + table_clusters
        need_blocks = -(-end // per_block)
        need_table = -(-(need_blocks * 8) // cs)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    if table_clusters * cs > fmt.MAX_REFCOUNT_TABLE_BYTES:
        raise ImageCorruptError(f"{image.path}: rebuilt refcount table would be too large")
    end = first_free + blocks + table_clusters
    counts.extend([0] * (end - len(counts)))
    for index in range(first_free, end):
        counts[index] = 1
    table = bytearray(table_clusters * cs)
    for block_index in range(blocks):
        block_offset = (first_free + block_index) * cs
        values = counts[block_index * per_block : (block_index + 1) * per_block]
        os.pwrite(image.fd, encode_block(values, bits, cs), block_offset)
        struct.pack_into(">Q", table, block_index * 8, block_offset)
    table_offset = (first_free + blocks) * cs
    os.pwrite(image.fd, bytes(table), table_offset)
    os.fdatasync(image.fd)
    image.file_size = max(image.file_size, end * cs)
    return table_offset, table_clusters
