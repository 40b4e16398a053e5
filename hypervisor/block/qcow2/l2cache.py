"""The L2 table cache (QEMU docs/qcow2-cache.txt, in spirit): decoded tables keyed by host offset.

Tables are native-endian `array('Q')` (two words per entry with extended L2), so a lookup is a dict
hit and an index. Dirty tables are written back at flush, after the refcounts they depend on are
durable. Clean tables are evicted first-in-first-out when the cache is over its size; if every
table is dirty the owner must flush (`needs_flush`).
"""

from __future__ import annotations

from array import array

from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.refcount import dump_u64_table, load_u64_table

# Upper bound of the cache: 32 MiB of L2 tables (covers 256 GiB of disk with 64 KiB clusters).
MAX_CACHE_BYTES = 32 << 20


class L2Cache:
    def __init__(self, hf: HostFile, cluster_size: int, tables_wanted: int) -> None:
        self.hf = hf
        self.cluster_size = cluster_size
        self.capacity = max(16, min(tables_wanted, MAX_CACHE_BYTES // cluster_size))
        self.tables: dict[int, array] = {}
        self.dirty: set[int] = set()

    def load(self, offset: int) -> array:
        table = self.tables.get(offset)
        if table is None:
            table = load_u64_table(self.hf.pread(offset, self.cluster_size))
            self._make_room()
            self.tables[offset] = table
        return table

    def install(self, offset: int, table: array) -> None:
        """A table created in memory (new or copied): dirty until the next flush."""
        self._make_room()
        self.tables[offset] = table
        self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def _make_room(self) -> None:
        if len(self.tables) < self.capacity:
            return
        for offset in list(self.tables):
            if offset not in self.dirty:
                del self.tables[offset]
                if len(self.tables) < self.capacity:
                    return

    @property
    def needs_flush(self) -> bool:
        return len(self.dirty) >= self.capacity

    def write_dirty(self) -> bool:
        """Write every dirty table (caller syncs). True if anything was written."""
        if not self.dirty:
            return False
        for offset in sorted(self.dirty):
            self.hf.pwrite(offset, dump_u64_table(self.tables[offset]))
        self.dirty.clear()
        return True

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()
