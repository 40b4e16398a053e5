"""qcow2 on-disk structures and constants, straight from QEMU's docs/interop/qcow2.rst.

Only layouts live here (construct structs and named bit fields); what they mean for allocation is
in the sibling modules. Every number in qcow2 is big-endian.
"""

from __future__ import annotations

from construct import (
    Bytes,
    Const,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
)

# -- "Header" --------------------------------------------------------------------------------
MAGIC = b"QFI\xfb"
SUPPORTED_VERSIONS = (2, 3)
HEADER_V2_LENGTH = 72  # "For version 2, the header is exactly 72 bytes"
HEADER_V3_MIN_LENGTH = 104  # "For version 3 ... at least 104 bytes"
HEADER_COMPRESSION_TYPE_OFFSET = 104  # "Additional fields": compression_type at byte 104
# What QEMU writes for v3: the 104 bytes, compression_type, padding to 112 ("header_length ...
# must be a multiple of 8").
HEADER_V3_LENGTH = 112
# QEMU keeps a disk's length in 512-byte sectors (block_int.h BDRV_SECTOR_SIZE, total_sectors).
SECTOR_SIZE = 512
MAX_BACKING_NAME = 1023  # backing_file_size "Must not be longer than 1023 bytes"
MIN_CLUSTER_BITS = 9  # "Must not be less than 9 (i.e. 512 byte clusters)"
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit of 2 MB clusters
MIN_CLUSTER_BITS_EXTENDED_L2 = 14  # "if the image has Extended L2 Entries ... at least 14"
MAX_REFCOUNT_ORDER = 6  # "This value may not exceed 6 (i.e. refcount_bits = 64)"
V2_REFCOUNT_ORDER = 4  # "For version 2 images, the order is always assumed to be 4"
MAX_L1_BYTES = 32 << 20  # QEMU limit: "32 MB as the maximum L1 table size"
MAX_REFCOUNT_TABLE_BYTES = 8 << 20  # QEMU limit: "8 MB as the maximum refcount table size"

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
CRYPT_NAMES = {CRYPT_AES: "legacy AES", CRYPT_LUKS: "LUKS"}

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2
# Names QEMU writes in its feature-name table, used when an image has no table of its own.
BUILTIN_FEATURE_NAMES = {
    (FEATURE_TYPE_INCOMPATIBLE, 0): "dirty bit",
    (FEATURE_TYPE_INCOMPATIBLE, 1): "corrupt bit",
    (FEATURE_TYPE_INCOMPATIBLE, 2): "external data file",
    (FEATURE_TYPE_INCOMPATIBLE, 3): "compression type",
    (FEATURE_TYPE_INCOMPATIBLE, 4): "extended L2 entries",
    (FEATURE_TYPE_COMPATIBLE, 0): "lazy refcounts",
    (FEATURE_TYPE_AUTOCLEAR, 0): "bitmaps",
    (FEATURE_TYPE_AUTOCLEAR, 1): "raw external data",
}

HeaderV2 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)
HeaderV3Fields = Struct(  # bytes 72..103
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

# -- "Header extensions" ---------------------------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXTENSION_ALIGN = 8  # "Padding to round up the header extension size to the next multiple of 8"

ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)
FeatureNameEntry = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))
FEATURE_NAME_ENTRY_SIZE = 48
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
BITMAPS_EXTENSION_SIZE = 24

# -- "Bitmap directory" ----------------------------------------------------------------------
BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BITMAP_DIRECTORY_ENTRY_FIXED = 24
BITMAP_FLAG_IN_USE = 1 << 0
BITMAP_FLAG_AUTO = 1 << 1
BITMAP_TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bitmap table entry bits 9-55
BITMAP_TABLE_RESERVED_MASK = 0xFF00_0000_0000_01FE  # bits 1-8 and 56-63 ("Reserved and must be zero")

# -- "Snapshots" -----------------------------------------------------------------------------
SnapshotEntryFixed = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_ENTRY_FIXED = 40
# Extra data: bytes 40-47 vm_state_size_large, 48-55 disk_size, 56-63 icount.
SNAPSHOT_EXTRA_V3_MIN = 16  # "Version 3 images must include extra data at least up to byte 55"
SNAPSHOT_EXTRA_SIZE = 24
MAX_SNAPSHOTS = 65536  # QEMU QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024  # QEMU QCOW_MAX_SNAPSHOT_EXTRA_DATA

# -- "Host cluster management": refcount table entry -----------------------------------------
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00  # bits 9-63
REFT_RESERVED_MASK = 0x1FF

# -- "Cluster mapping": L1 / L2 entries ------------------------------------------------------
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62
OFLAG_COPIED = 1 << 63  # L1 and L2: refcount is exactly one
OFLAG_COMPRESSED = 1 << 62  # L2: compressed cluster descriptor follows
OFLAG_ZERO = 1 << 0  # standard cluster descriptor bit 0: reads as zeros (v3 only)
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # standard descriptor bits 9-55
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61
# Any of these bits: not a plain data cluster whose bytes are at its host offset (the Reader's hot
# loop and plainmap.py's cache fill, which must agree on what is plain).
L2E_NOT_PLAIN_DATA = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK
COMPRESSED_SECTOR_SIZE = 512  # "Number of additional 512-byte sectors"

# Extended L2: 128-bit entries, second half is the subcluster bitmap.
SUBCLUSTERS_PER_CLUSTER = 32
SUBCLUSTER_ALLOC_MASK = 0xFFFF_FFFF  # bits 0-31: allocated
SUBCLUSTER_ZERO_SHIFT = 32  # bits 32-63: reads as zeros


def compressed_layout(cluster_bits: int) -> tuple[int, int]:
    """(offset mask, sector-count shift) of a compressed cluster descriptor.

    "Compressed Clusters Descriptor (x = 62 - (cluster_bits - 8))": bits 0..x-1 host offset,
    bits x..61 additional 512-byte sectors.
    """
    x = 62 - (cluster_bits - 8)
    return (1 << x) - 1, x


def compressed_span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length) of the compressed data an L2 entry describes."""
    offset_mask, shift = compressed_layout(cluster_bits)
    host_offset = entry & offset_mask
    sectors = (entry & ~OFLAG_COPIED & ~OFLAG_COMPRESSED) >> shift
    end = (host_offset & ~(COMPRESSED_SECTOR_SIZE - 1)) + (sectors + 1) * COMPRESSED_SECTOR_SIZE
    return host_offset, end - host_offset


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """An L2 entry for `length` bytes of compressed data at `host_offset` (COPIED is never set)."""
    _, shift = compressed_layout(cluster_bits)
    last_sector = (host_offset + length - 1) // COMPRESSED_SECTOR_SIZE
    extra_sectors = last_sector - host_offset // COMPRESSED_SECTOR_SIZE
    return OFLAG_COMPRESSED | (extra_sectors << shift) | host_offset


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
