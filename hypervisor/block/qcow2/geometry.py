"""The shape of one qcow2 image: cluster size, L2 entry layout, and the guest offset arithmetic.

qcow2.rst "Cluster mapping": a guest offset splits into an L1 index, an L2 index and an offset
inside the cluster; "Extended L2 Entries": with extended L2 every entry is two 64-bit words (the
second one the subcluster bitmap) and a cluster has 32 subclusters. Everything here is a function
of the header and never changes while the image is open, hence a frozen value.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.header import Qcow2Header

# qcow2.rst "Extended L2 Entries": every cluster has 32 subclusters (a 32-bit bitmap).
_SUBCLUSTERS_LOG2 = 5


@dataclass(frozen=True, slots=True)
class Geometry:
    cluster_bits: int
    cluster_size: int
    extended_l2: bool  # two words per L2 entry, subclusters
    l2_entries: int  # entries per L2 table
    l2_bits: int  # log2(l2_entries)
    l2_mask: int  # l2_entries - 1
    ext_shift: int  # log2 of 64-bit words per L2 entry (1 with extended L2)
    subcluster_bits: int  # log2 of the subcluster size
    v3: bool  # version 3: zero clusters, feature bits
    has_data_file: bool  # incompatible feature "external data file"

    @classmethod
    def from_header(cls, header: Qcow2Header) -> Geometry:
        cluster_bits = header.cluster_bits
        l2_entries = header.l2_entries
        return cls(
            cluster_bits=cluster_bits,
            cluster_size=1 << cluster_bits,
            extended_l2=header.extended_l2,
            l2_entries=l2_entries,
            l2_bits=l2_entries.bit_length() - 1,
            l2_mask=l2_entries - 1,
            ext_shift=1 if header.extended_l2 else 0,
            subcluster_bits=cluster_bits - _SUBCLUSTERS_LOG2,
            v3=header.version >= 3,
            has_data_file=bool(header.incompatible_features & fmt.INCOMPAT_DATA_FILE),
        )

    @property
    def in_cluster_mask(self) -> int:
        return self.cluster_size - 1

    @property
    def words_per_entry(self) -> int:
        return 1 << self.ext_shift

    @property
    def bytes_per_l2(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.l2_entries << self.cluster_bits

    def split(self, offset: int) -> tuple[int, int, int]:
        """(L1 index, L2 entry index, offset in the cluster) of a guest byte offset."""
        guest_cluster = offset >> self.cluster_bits
        return guest_cluster >> self.l2_bits, guest_cluster & self.l2_mask, offset & (self.cluster_size - 1)

    def l1_index(self, guest_cluster: int) -> int:
        return guest_cluster >> self.l2_bits

    def l2_word(self, guest_cluster: int) -> int:
        """Index of the guest cluster's first word in its L2 table (array of 64-bit words)."""
        return (guest_cluster & self.l2_mask) << self.ext_shift

    def clusters(self, length: int) -> int:
        """Clusters needed for `length` bytes (at least one: a table always takes a cluster)."""
        return max(1, -(-length // self.cluster_size))

    def cluster_range(self, offset: int, length: int) -> range:
        """Host cluster indexes a byte range touches (an empty range still names its cluster)."""
        cb = self.cluster_bits
        return range(offset >> cb, (offset + max(length, 1) + self.cluster_size - 1) >> cb)

    def compressed_clusters(self, entry: int) -> list[tuple[int, int]]:
        """(host offset, 1) for every host cluster a compressed extent touches; each holds one
        reference per extent (qcow2.rst "Compressed Clusters Descriptor")."""
        cb = self.cluster_bits
        host, n = fmt.compressed_span(entry, cb)
        return [(c << cb, 1) for c in range(host >> cb, ((host + n - 1) >> cb) + 1)]
