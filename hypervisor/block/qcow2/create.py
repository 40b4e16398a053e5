"""Writing a fresh qcow2 image (and raw files), laid out the way `qemu-img create` lays them out.

Layout (QEMU's qcow2_co_create followed by its truncate): cluster 0 holds the header, its
extensions and the backing file name; then the refcount table, the refcount blocks, the L1
table, and with preallocation=metadata each L2 table followed by the data clusters it maps.
Every cluster written gets refcount 1, so `qemu-img check` finds neither leaks nor corruptions.

Everything is validated before the target file is touched, so a bad option never clobbers an
existing file, and the image is built under a temporary name and renamed over the target when
complete (staging.py), so a crash leaves the old target or the new image, never half of one.
Format reference: QEMU docs/interop/qcow2.rst ("Header", "Header extensions", "Host cluster
management", "Cluster mapping").
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from array import array
from dataclasses import dataclass
from re import Pattern

from hypervisor.block.locking import lock_image
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.refcount import encode_block, refcount_structure_size, refcount_typecode
from hypervisor.block.qcow2.staging import staged
from hypervisor.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

# Smallest header cluster QEMU writes the feature name table into (see _header_cluster).
FEATURE_TABLE_MIN_CLUSTER_SIZE = 8192
# compression_type names as `-o compression_type=` takes them (qcow2.rst "compression_type").
COMPRESSION_TYPES = {name: code for code, name in fmt.COMPRESSION_NAMES.items()}
# qcow2.rst "Extended L2 Entries": 32 subclusters of at least 512 bytes (QEMU: 16 KiB clusters).
MIN_EXTENDED_L2_CLUSTER_SIZE = 1 << fmt.MIN_CLUSTER_BITS_EXTENDED_L2
MAX_VIRTUAL_SIZE = 1 << 55

BACKING_FORMATS = ("qcow2", "raw")
PREALLOCATION_MODES = ("off", "metadata")


@dataclass(frozen=True)
class Qcow2CreateOptions:
    """What `qemu-img create -f qcow2 -o ...` accepts, with QEMU's defaults."""

    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    lazy_refcounts: bool = False
    extended_l2: bool = False
    refcount_bits: int = 16
    preallocation: str = "off"
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_format: str | None = None

    @property
    def version(self) -> int:
        return 2 if self.compat in ("0.10", "v2") else 3

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def refcount_order(self) -> int:
        return self.refcount_bits.bit_length() - 1

    @property
    def rounded_size(self) -> int:
        """QEMU rounds a qcow2 virtual size up to whole 512-byte sectors."""
        return fmt.align_up(self.size, fmt.SECTOR_SIZE)


def validate(options: Qcow2CreateOptions) -> None:
    """Refuse what QEMU refuses, with QEMU's wording where it has one; ConfigError on failure."""
    if options.size < 0:
        raise ConfigError(f"invalid image size {options.size}")
    cs = options.cluster_size
    if cs & (cs - 1) or not (1 << fmt.MIN_CLUSTER_BITS) <= cs <= (1 << fmt.MAX_CLUSTER_BITS):
        raise ConfigError("Cluster size must be a power of two between 512 and 2048k")
    rb = options.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise ConfigError("Refcount width must be a power of two and may not exceed 64 bits")
    if options.compat not in ("0.10", "1.1", "v2", "v3"):
        raise ConfigError(f"Invalid compatibility level: '{options.compat}'")
    if options.preallocation not in PREALLOCATION_MODES:
        raise ConfigError(f"Unsupported preallocation mode '{options.preallocation}' (supported: off, metadata)")
    if options.compression_type not in COMPRESSION_TYPES:
        raise ConfigError(f"Unknown compression type '{options.compression_type}' (zlib or zstd)")
    if options.version == 2:
        if options.lazy_refcounts:
            raise ConfigError("Lazy refcounts only supported with compatibility level 1.1 and above")
        if rb != 16:
            raise ConfigError("Different refcount widths than 16 bits require compatibility level 1.1")
        if options.extended_l2:
            raise ConfigError("Extended L2 entries are only supported with compatibility level 1.1")
        if options.compression_type != "zlib":
            raise ConfigError("Compression type other than zlib requires compatibility level 1.1")
    if options.extended_l2 and cs < MIN_EXTENDED_L2_CLUSTER_SIZE:
        raise ConfigError(
            f"Extended L2 entries are only supported with cluster sizes of at least "
            f"{MIN_EXTENDED_L2_CLUSTER_SIZE} bytes"
        )
    if options.backing_file is not None:
        if options.backing_format is None:
            raise ConfigError("Backing file specified without backing format (use -F qcow2|raw)")
        if options.backing_format not in BACKING_FORMATS:
            raise ConfigError(f"Unsupported backing format '{options.backing_format}' (qcow2 or raw)")
        name = options.backing_file.encode()
        if not name or len(name) > fmt.MAX_BACKING_NAME:
            raise ConfigError(f"Backing file name must be 1 to {fmt.MAX_BACKING_NAME} bytes long")
        if b"\0" in name:
            raise ConfigError("Backing file name contains a NUL byte")
        if options.preallocation != "off":
            raise ConfigError("Backing file and preallocation can only be used at the same time with preallocation=off")
    elif options.backing_format is not None:
        raise ConfigError("Backing format given without a backing file (-F needs -b)")
    # qcow2.rst: host offsets have 56 bits; QEMU also limits the virtual size to 2^55 bytes.
    if options.rounded_size > MAX_VIRTUAL_SIZE:
        raise ConfigError(f"Image size {options.size} is too large for qcow2")


def _header_extension(ext_type: int, data: bytes) -> bytes:
    """qcow2.rst "Header extensions": type, length, data padded to a multiple of 8 bytes."""
    padding = -len(data) % fmt.EXTENSION_ALIGN
    return struct.pack(">II", ext_type, len(data)) + data + b"\0" * padding


def _feature_name_table() -> bytes:
    """qcow2.rst "Feature name table": the names QEMU writes into every v3 image, in its order."""
    return b"".join(
        fmt.FeatureNameEntry.build({"type": kind, "bit": bit, "name": name.encode().ljust(46, b"\0")})
        for (kind, bit), name in fmt.BUILTIN_FEATURE_NAMES.items()
    )


def _header_cluster(
    options: Qcow2CreateOptions, l1_size: int, l1_offset: int, refcount_table_offset: int, refcount_table_clusters: int
) -> bytes:
    """Cluster 0: header fields, extensions, end marker, backing file name (qcow2.rst "Header")."""
    version = options.version
    header_length = fmt.HEADER_V2_LENGTH if version == 2 else fmt.HEADER_V3_LENGTH
    extensions = b""
    if options.backing_format is not None:
        extensions += _header_extension(fmt.EXT_BACKING_FORMAT, options.backing_format.encode())
    backing_name = options.backing_file.encode() if options.backing_file else b""
    end = _header_extension(fmt.EXT_END, b"")
    if version == 3:
        # QEMU 7.2 writes the feature name table only into header clusters of 8 KiB or more
        # (observed with qemu-img create; smaller images carry none, which the spec allows).
        if options.cluster_size >= FEATURE_TABLE_MIN_CLUSTER_SIZE:
            extensions += _header_extension(fmt.EXT_FEATURE_NAMES, _feature_name_table())
    extensions += end
    backing_offset = header_length + len(extensions) if backing_name else 0
    if header_length + len(extensions) + len(backing_name) > options.cluster_size:
        raise ConfigError("Backing file name does not fit into the header cluster")

    incompatible = 0
    compatible = 0
    if options.extended_l2:
        incompatible |= fmt.INCOMPAT_EXTL2
    if options.compression_type != "zlib":
        incompatible |= fmt.INCOMPAT_COMPRESSION
    if options.lazy_refcounts:
        compatible |= fmt.COMPAT_LAZY_REFCOUNTS
    fields = struct.pack(
        ">4sIQIIQIIQQIIQ",
        fmt.MAGIC,
        version,
        backing_offset,
        len(backing_name),
        options.cluster_bits,
        options.rounded_size,
        0,  # crypt_method: pyhv never creates encrypted images
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
    )
    if version == 3:
        fields += struct.pack(
            ">QQQIIB7x",
            incompatible,
            compatible,
            0,
            options.refcount_order,
            header_length,
            COMPRESSION_TYPES[options.compression_type],
        )
    assert len(fields) == header_length
    return fields + extensions + backing_name


@dataclass(frozen=True)
class _Layout:
    """Cluster indices of each structure; all clusters below `total_clusters` are in use."""

    refcount_table_clusters: int
    refcount_blocks: int
    l1_size: int
    l1_clusters: int
    l2_tables: int
    data_clusters: int

    @property
    def refcount_table_index(self) -> int:
        return 1

    @property
    def refcount_block_index(self) -> int:
        return 1 + self.refcount_table_clusters

    @property
    def l1_index(self) -> int:
        return self.refcount_block_index + self.refcount_blocks

    @property
    def metadata_end_index(self) -> int:
        return self.l1_index + self.l1_clusters

    @property
    def total_clusters(self) -> int:
        return self.metadata_end_index + self.l2_tables + self.data_clusters


def _plan(options: Qcow2CreateOptions) -> _Layout:
    cs = options.cluster_size
    l2_entry_size = 16 if options.extended_l2 else 8  # qcow2.rst "Extended L2 Entries"
    l2_entries = cs // l2_entry_size
    data_clusters = (options.rounded_size + cs - 1) // cs
    l1_size = (data_clusters + l2_entries - 1) // l2_entries
    l1_clusters = (l1_size * 8 + cs - 1) // cs
    prealloc = options.preallocation == "metadata"
    l2_tables = l1_size if prealloc else 0
    allocated_data = data_clusters if prealloc else 0
    # Every cluster of the new image is in use, so only how many there are matters for the
    # refcount structure, not where it sits: it covers the header, the L1 (and preallocated
    # tables and data) and itself.
    refcounts = refcount_structure_size(1 + l1_clusters + l2_tables + allocated_data, cs, options.refcount_bits)
    return _Layout(refcounts.table_clusters, refcounts.blocks, l1_size, l1_clusters, l2_tables, allocated_data)


def _refcount_block(first_cluster: int, in_use: int, options: Qcow2CreateOptions) -> bytes:
    """One refcount block with refcount 1 for clusters < in_use (qcow2.rst "refcount_block_entry":
    sub-byte widths are packed from the least significant bit, wider ones big-endian)."""
    cs = options.cluster_size
    bits = options.refcount_bits
    per_block = cs * 8 // bits
    count = max(0, min(per_block, in_use - first_cluster))
    return encode_block(array(refcount_typecode(bits), [1]) * count, bits, cs)


def create_qcow2(
    path: str, options: Qcow2CreateOptions, purpose: str = "create", legacy: Pattern[str] | None = None
) -> None:
    """Write a new qcow2 image at `path` (replacing a file there, as qemu-img does), built under a
    temporary name and renamed into place (staging.py): a crash never leaves a half-made image."""
    validate(options)
    with staged(path, purpose, legacy) as stage:
        write_qcow2(stage.path, options, shown_as=path)
        stage.commit()


def write_qcow2(path: str, options: Qcow2CreateOptions, shown_as: str | None = None) -> None:
    """Write a new qcow2 image directly into `path` (no staging); errors name `shown_as`."""
    validate(options)
    shown = shown_as or path
    cs = options.cluster_size
    layout = _plan(options)
    l1_offset = layout.l1_index * cs if layout.l1_size else 0
    header = _header_cluster(
        options, layout.l1_size, l1_offset, layout.refcount_table_index * cs, layout.refcount_table_clusters
    )
    refcount_table = b"".join(
        struct.pack(">Q", (layout.refcount_block_index + i) * cs) for i in range(layout.refcount_blocks)
    )
    total = layout.total_clusters
    per_block = cs * 8 // options.refcount_bits
    fd = _open_for_replacing(path, shown)
    try:
        os.pwrite(fd, header, 0)
        os.pwrite(fd, refcount_table, layout.refcount_table_index * cs)
        for i in range(layout.refcount_blocks):
            block = _refcount_block(i * per_block, total, options)
            os.pwrite(fd, block, (layout.refcount_block_index + i) * cs)
        end = layout.metadata_end_index * cs
        if options.preallocation == "metadata":
            end = _write_preallocated_tables(fd, options, layout, l1_offset)
        elif layout.l1_size:
            # QEMU leaves the file ending right after the L1 table (zeros: nothing allocated).
            end = l1_offset + layout.l1_size * 8
        os.ftruncate(fd, end)
        os.fsync(fd)
    except OSError as error:
        raise ImageError(f"Could not write '{shown}': {error.strerror}") from error
    finally:
        os.close(fd)
    log.info("created %s: qcow2 v%d, %d bytes, cluster size %d", shown, options.version, options.rounded_size, cs)


def _write_preallocated_tables(fd: int, options: Qcow2CreateOptions, layout: _Layout, l1_offset: int) -> int:
    """preallocation=metadata: each L2 table right before the data clusters it maps, every entry
    allocated with COPIED set and no zero flag (the sparse file reads back as zeros), as QEMU does;
    with extended L2 the subcluster bitmap stays 0, again as QEMU writes it."""
    cs = options.cluster_size
    entry_size = 16 if options.extended_l2 else 8
    entries_per_l2 = cs // entry_size
    remaining = layout.data_clusters
    cluster = layout.metadata_end_index
    l1 = bytearray(layout.l1_size * 8)
    for table in range(layout.l2_tables):
        l2_offset = cluster * cs
        struct.pack_into(">Q", l1, table * 8, fmt.OFLAG_COPIED | l2_offset)
        count = min(entries_per_l2, remaining)
        l2 = bytearray(cs)
        for i in range(count):
            struct.pack_into(">Q", l2, i * entry_size, fmt.OFLAG_COPIED | (cluster + 1 + i) * cs)
        os.pwrite(fd, bytes(l2), l2_offset)
        remaining -= count
        cluster += 1 + count
    os.pwrite(fd, bytes(l1), l1_offset)
    end = cluster * cs
    tail = options.rounded_size % cs
    if options.extended_l2 and tail:
        # QEMU ends the file at the subcluster holding the last virtual byte (qcow2.rst
        # "Extended L2 Entries": 32 subclusters per cluster).
        subcluster = cs // fmt.SUBCLUSTERS_PER_CLUSTER
        end -= cs - (tail + subcluster - 1) // subcluster * subcluster
    return end


def _open_for_replacing(path: str, shown: str) -> int:
    """Open (creating) `path`, take QEMU's write lock, and only then empty it: a file that a
    running QEMU or pyhv has open is refused (ImageLockedError) and left as it was."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise ImageError(f"Could not create '{shown}': {error.strerror}") from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"Could not create '{shown}': not a regular file")
        lock_image(fd, shown, writable=True)
        os.ftruncate(fd, 0)
    except OSError as error:
        os.close(fd)
        raise ImageError(f"Could not create '{shown}': {error.strerror}") from error
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_raw(path: str, size: int) -> None:
    """A sparse raw file of `size` bytes (qemu-img create -f raw, preallocation=off), staged
    like create_qcow2."""
    if size < 0:
        raise ConfigError(f"invalid image size {size}")
    with staged(path, "create") as stage:
        write_raw(stage.path, size, shown_as=path)
        stage.commit()


def write_raw(path: str, size: int, shown_as: str | None = None, sync: bool = True) -> None:
    """A sparse raw file of `size` bytes directly at `path` (no staging); `sync` false for a
    caller that will not sync what it writes into it either (`convert -t unsafe`)."""
    if size < 0:
        raise ConfigError(f"invalid image size {size}")
    shown = shown_as or path
    rounded = fmt.align_up(size, fmt.SECTOR_SIZE)
    fd = _open_for_replacing(path, shown)
    try:
        os.ftruncate(fd, rounded)
        if sync:
            os.fsync(fd)
    except OSError as error:
        raise ImageError(f"Could not resize '{shown}': {error.strerror}") from error
    finally:
        os.close(fd)
