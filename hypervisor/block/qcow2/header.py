"""The qcow2 header cluster: parse and validate it at open, rewrite it preserving what we don't know.

qcow2.rst "Header", "Header extensions", "Feature name table". Validation happens here, before
any I/O on the tables, so a bad image is refused at open with one line. Unknown header extensions,
unknown compatible/autoclear bits, the feature-name table and any extra header bytes are kept and
written back unchanged by `serialize`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from construct import ConstructError

from hypervisor.block.qcow2 import format as fmt
from hypervisor.errors import ImageCorruptError, ImageFormatError


@dataclass
class HeaderExtension:
    type: int
    data: bytes


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = fmt.V2_REFCOUNT_ORDER
    header_length: int = fmt.HEADER_V2_LENGTH
    compression_type: int = fmt.COMPRESSION_DEFLATE
    # Bytes 105..header_length (padding and fields newer than this code), kept verbatim.
    extra_header: bytes = b""
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & fmt.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def extension(self, ext_type: int) -> bytes | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext.data
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or add at the front, or with None remove) one extension, keeping the others."""
        for i, ext in enumerate(self.extensions):
            if ext.type == ext_type:
                if data is None:
                    del self.extensions[i]
                else:
                    ext.data = data
                return
        if data is not None:
            self.extensions.insert(0, HeaderExtension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        data = self.extension(fmt.EXT_BACKING_FORMAT)
        return data.decode("utf-8", "replace") if data is not None else None

    @property
    def data_file(self) -> str | None:
        data = self.extension(fmt.EXT_DATA_FILE)
        return data.decode("utf-8", "replace") if data is not None else None

    def feature_name(self, feature_type: int, bit: int) -> str:
        name = self.feature_names.get((feature_type, bit)) or fmt.BUILTIN_FEATURE_NAMES.get((feature_type, bit))
        return name or f"unknown feature bit {bit}"

    def l1_entries_needed(self, size: int | None = None) -> int:
        """L1 entries needed to map `size` bytes (qcow2.rst "Cluster mapping")."""
        size = self.size if size is None else size
        bytes_per_l2 = self.l2_entries * self.cluster_size
        return (size + bytes_per_l2 - 1) // bytes_per_l2


def parse_header(buf: bytes, file_size: int, path: str) -> Qcow2Header:
    """Parse and validate the header cluster `buf` (at least the first cluster, or the whole file)."""
    if len(buf) < 4 or buf[:4] != fmt.MAGIC:
        raise ImageFormatError(f"{path}: not a qcow2 image (bad magic)")
    if len(buf) < fmt.HEADER_V2_LENGTH:
        raise ImageCorruptError(f"{path}: qcow2 header truncated ({len(buf)} of {fmt.HEADER_V2_LENGTH} bytes)")
    try:
        v2 = fmt.HeaderV2.parse(buf[: fmt.HEADER_V2_LENGTH])
    except ConstructError as exc:  # pragma: no cover - lengths are checked above
        raise ImageCorruptError(f"{path}: unreadable qcow2 header: {exc}") from None
    if v2.version not in fmt.SUPPORTED_VERSIONS:
        raise ImageFormatError(f"{path}: unsupported qcow2 version {v2.version} (pyhv reads 2 and 3)")
    header = Qcow2Header(**{k: v for k, v in v2.items() if k not in ("magic", "_io")})
    # One virtual-size rule for every reader (info, map, convert, check, the virtio disk): whole
    # 512-byte sectors, rounded down, as QEMU's qcow2_do_open does (total_sectors = size / 512).
    # qcow2.rst does not require a multiple of 512; a rewritten header stores the rounded size,
    # as QEMU's qcow2_update_header does.
    header.size -= header.size % fmt.SECTOR_SIZE
    if not fmt.MIN_CLUSTER_BITS <= header.cluster_bits <= fmt.MAX_CLUSTER_BITS:
        raise ImageFormatError(
            f"{path}: cluster_bits {header.cluster_bits} outside the supported range "
            f"{fmt.MIN_CLUSTER_BITS}..{fmt.MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
        )
    cluster_size = header.cluster_size
    if header.version >= 3:
        if len(buf) < fmt.HEADER_V3_MIN_LENGTH:
            raise ImageCorruptError(f"{path}: qcow2 v3 header truncated ({len(buf)} bytes)")
        v3 = fmt.HeaderV3Fields.parse(buf[fmt.HEADER_V2_LENGTH : fmt.HEADER_V3_MIN_LENGTH])
        header.incompatible_features = v3.incompatible_features
        header.compatible_features = v3.compatible_features
        header.autoclear_features = v3.autoclear_features
        header.refcount_order = v3.refcount_order
        header.header_length = v3.header_length
        if header.header_length < fmt.HEADER_V3_MIN_LENGTH or header.header_length % 8:
            raise ImageCorruptError(f"{path}: invalid qcow2 header_length {header.header_length}")
        if header.header_length > min(cluster_size, len(buf)):
            raise ImageCorruptError(f"{path}: qcow2 header_length {header.header_length} runs past the header")
        if header.header_length > fmt.HEADER_COMPRESSION_TYPE_OFFSET:
            header.compression_type = buf[fmt.HEADER_COMPRESSION_TYPE_OFFSET]
            header.extra_header = bytes(buf[fmt.HEADER_COMPRESSION_TYPE_OFFSET + 1 : header.header_length])
    if header.refcount_order > fmt.MAX_REFCOUNT_ORDER:
        raise ImageCorruptError(f"{path}: refcount_order {header.refcount_order} > {fmt.MAX_REFCOUNT_ORDER}")

    _parse_extensions(header, buf, path)
    _check_features(header, path)
    _check_tables(header, file_size, path)
    _parse_backing_name(header, buf, path)
    return header


def _extension_area_end(header: Qcow2Header) -> int:
    """Extensions must end before the backing file name (if any) and within the first cluster."""
    end = header.cluster_size
    if header.backing_file_offset and header.backing_file_offset < end:
        end = header.backing_file_offset
    return end


def _parse_extensions(header: Qcow2Header, buf: bytes, path: str) -> None:
    offset = header.header_length
    end = min(_extension_area_end(header), len(buf))
    seen: set[int] = set()
    while offset + 8 <= end:
        ext_type, length = struct.unpack_from(">II", buf, offset)
        if ext_type == fmt.EXT_END:
            return
        data_end = offset + 8 + length
        if data_end > end:
            raise ImageCorruptError(f"{path}: header extension 0x{ext_type:08x} runs past the header area")
        data = bytes(buf[offset + 8 : data_end])
        if ext_type in seen and ext_type != 0:
            raise ImageCorruptError(f"{path}: header extension 0x{ext_type:08x} appears twice")
        seen.add(ext_type)
        header.extensions.append(HeaderExtension(ext_type, data))
        if ext_type == fmt.EXT_FEATURE_NAMES:
            for i in range(0, len(data) - fmt.FEATURE_NAME_ENTRY_SIZE + 1, fmt.FEATURE_NAME_ENTRY_SIZE):
                entry = fmt.FeatureNameEntry.parse(data[i : i + fmt.FEATURE_NAME_ENTRY_SIZE])
                name = entry.name.split(b"\0", 1)[0].decode("utf-8", "replace")
                header.feature_names[(entry.type, entry.bit)] = name
        offset = fmt.align_up(data_end, fmt.EXTENSION_ALIGN)
    if header.version >= 3 and offset < end and offset + 8 > end:
        raise ImageCorruptError(f"{path}: header extension area not terminated")


def _check_features(header: Qcow2Header, path: str) -> None:
    unknown = header.incompatible_features & ~fmt.INCOMPAT_KNOWN
    if unknown:
        names = [header.feature_name(fmt.FEATURE_TYPE_INCOMPATIBLE, bit) for bit in range(64) if unknown >> bit & 1]
        raise ImageFormatError(f"{path}: unsupported qcow2 feature(s): {', '.join(names)}")
    if header.crypt_method != fmt.CRYPT_NONE or header.extension(fmt.EXT_CRYPTO) is not None:
        kind = fmt.CRYPT_NAMES.get(header.crypt_method, f"method {header.crypt_method}")
        raise ImageFormatError(f"{path}: encrypted qcow2 images ({kind}) are not supported")
    has_type_bit = bool(header.incompatible_features & fmt.INCOMPAT_COMPRESSION)
    if has_type_bit != (header.compression_type != fmt.COMPRESSION_DEFLATE):
        raise ImageCorruptError(
            f"{path}: compression type {header.compression_type} does not match the compression-type feature bit"
        )
    if header.compression_type not in fmt.COMPRESSION_NAMES:
        raise ImageFormatError(f"{path}: unknown compression type {header.compression_type}")
    if header.extended_l2 and header.cluster_bits < fmt.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise ImageCorruptError(f"{path}: extended L2 entries need clusters of at least 16 KiB")
    if header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW and not (
        header.incompatible_features & fmt.INCOMPAT_DATA_FILE
    ):
        raise ImageCorruptError(f"{path}: raw external data bit set without an external data file")


def _check_tables(header: Qcow2Header, file_size: int, path: str) -> None:
    cs = header.cluster_size

    def check_area(name: str, offset: int, length: int) -> None:
        if offset % cs:
            raise ImageCorruptError(f"{path}: {name} offset 0x{offset:x} is not cluster aligned")
        if offset < cs and length:
            raise ImageCorruptError(f"{path}: {name} at 0x{offset:x} overlaps the header")
        if offset + length > file_size:
            raise ImageCorruptError(f"{path}: {name} (0x{offset:x}, {length} bytes) is past the end of the file")

    if header.l1_size * 8 > fmt.MAX_L1_BYTES:
        raise ImageCorruptError(f"{path}: active L1 table too large ({header.l1_size} entries)")
    if header.l1_size < header.l1_entries_needed():
        raise ImageCorruptError(f"{path}: L1 table too small for the virtual size")
    check_area("L1 table", header.l1_table_offset, header.l1_size * 8)
    if header.refcount_table_clusters == 0:
        raise ImageCorruptError(f"{path}: refcount table is empty")
    if header.refcount_table_clusters * cs > fmt.MAX_REFCOUNT_TABLE_BYTES:
        raise ImageCorruptError(f"{path}: refcount table too large ({header.refcount_table_clusters} clusters)")
    check_area("refcount table", header.refcount_table_offset, header.refcount_table_clusters * cs)
    if header.nb_snapshots > fmt.MAX_SNAPSHOTS:
        raise ImageCorruptError(f"{path}: too many snapshots ({header.nb_snapshots})")
    if header.nb_snapshots:
        check_area("snapshot table", header.snapshots_offset, 40 * header.nb_snapshots)
    areas = sorted(
        [
            (header.l1_table_offset, header.l1_size * 8, "L1 table"),
            (header.refcount_table_offset, header.refcount_table_clusters * cs, "refcount table"),
        ]
    )
    (a_off, a_len, a_name), (b_off, _, b_name) = areas
    if a_len and a_off + fmt.align_up(a_len, cs) > b_off:
        raise ImageCorruptError(f"{path}: {a_name} overlaps the {b_name}")


def _parse_backing_name(header: Qcow2Header, buf: bytes, path: str) -> None:
    if not header.backing_file_offset:
        return
    if header.backing_file_size > fmt.MAX_BACKING_NAME:
        raise ImageCorruptError(f"{path}: backing file name too long ({header.backing_file_size} bytes)")
    end = header.backing_file_offset + header.backing_file_size
    if end > header.cluster_size or end > len(buf):
        raise ImageCorruptError(f"{path}: backing file name lies outside the header cluster")
    if header.backing_file_offset < header.header_length:
        raise ImageCorruptError(f"{path}: backing file name overlaps the header")
    raw_name = bytes(buf[header.backing_file_offset : end])
    try:
        header.backing_file = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageCorruptError(f"{path}: backing file name is not valid UTF-8") from None
    if "\0" in header.backing_file:
        raise ImageCorruptError(f"{path}: backing file name contains a NUL byte")


def serialize(header: Qcow2Header) -> bytes:
    """The header cluster's bytes: header fields, extensions, end marker, backing file name.

    The backing name goes right after the extension area (qcow2.rst "Header extensions"). Raises
    ImageFormatError if everything does not fit in the first cluster.
    """
    out = bytearray(
        fmt.HeaderV2.build(
            dict(
                version=header.version,
                backing_file_offset=0,
                backing_file_size=0,
                cluster_bits=header.cluster_bits,
                size=header.size,
                crypt_method=header.crypt_method,
                l1_size=header.l1_size,
                l1_table_offset=header.l1_table_offset,
                refcount_table_offset=header.refcount_table_offset,
                refcount_table_clusters=header.refcount_table_clusters,
                nb_snapshots=header.nb_snapshots,
                snapshots_offset=header.snapshots_offset,
            )
        )
    )
    if header.version >= 3:
        length = max(header.header_length, fmt.HEADER_V3_MIN_LENGTH)
        if header.compression_type and length <= fmt.HEADER_COMPRESSION_TYPE_OFFSET:
            length = fmt.HEADER_COMPRESSION_TYPE_OFFSET + 8
        header.header_length = length
        out += fmt.HeaderV3Fields.build(
            dict(
                incompatible_features=header.incompatible_features,
                compatible_features=header.compatible_features,
                autoclear_features=header.autoclear_features,
                refcount_order=header.refcount_order,
                header_length=length,
            )
        )
        if length > fmt.HEADER_COMPRESSION_TYPE_OFFSET:
            tail = bytes([header.compression_type]) + header.extra_header
            tail = tail[: length - fmt.HEADER_COMPRESSION_TYPE_OFFSET]
            out += tail.ljust(length - fmt.HEADER_COMPRESSION_TYPE_OFFSET, b"\0")
        for ext in header.extensions:
            out += struct.pack(">II", ext.type, len(ext.data)) + ext.data
            out += bytes(fmt.align_up(len(out), fmt.EXTENSION_ALIGN) - len(out))
        out += struct.pack(">II", fmt.EXT_END, 0)
    elif header.extensions:
        # v2 images may carry extensions too (QEMU writes the backing format one).
        for ext in header.extensions:
            out += struct.pack(">II", ext.type, len(ext.data)) + ext.data
            out += bytes(fmt.align_up(len(out), fmt.EXTENSION_ALIGN) - len(out))
        out += struct.pack(">II", fmt.EXT_END, 0)
    if header.backing_file:
        name = header.backing_file.encode("utf-8")
        if len(name) > fmt.MAX_BACKING_NAME:
            raise ImageFormatError(f"backing file name too long ({len(name)} bytes, max {fmt.MAX_BACKING_NAME})")
        header.backing_file_offset = len(out)
        header.backing_file_size = len(name)
        struct.pack_into(">QI", out, 8, header.backing_file_offset, header.backing_file_size)
        out += name
    else:
        header.backing_file_offset = 0
        header.backing_file_size = 0
    if len(out) > header.cluster_size:
        raise ImageFormatError(
            f"header, extensions and backing name do not fit in one {header.cluster_size}-byte cluster"
        )
    return bytes(out)
