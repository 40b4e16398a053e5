"""Issue 11: every reserved-bit and alignment rule of qcow2.rst, in every table the checker walks,
one image per rule with exactly one entry corrupted by a struct write; the message and the
counts are qemu-img 7.2's (`qemu-img check --output=json` on the same image) where pyhv follows
QEMU, and pyhv's stricter answer where it does not (docs/robustness.md lists both). Then a seeded
fuzz: random bit flips in the L1, L2, refcount and snapshot tables never crash the checker, and
`check -r all` never leaves an image that qemu-img finds more corrupt than before.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.block.qcow2.check import CheckResult, check_image
from hypervisor.cli import main
from hypervisor.errors import ImageError
from tests.block.qcow2_oracle import create, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
ALL_ALLOC = 0xFFFF_FFFF  # extended L2 bitmap: bits 0-31 allocated, 32-63 zero
MIB = 1 << 20


def be64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "big")


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def poke64(path: Path, offset: int, value: int) -> None:
    poke(path, offset, struct.pack(">Q", value))


def l1_slot(path: Path) -> int:
    return be64(path, 40)  # header l1_table_offset


def l2_slot(path: Path, index: int = 0, entry_size: int = 8) -> int:
    return (be64(path, l1_slot(path)) & OFFSET_MASK) + index * entry_size


def reftable_slot(path: Path, index: int = 0) -> int:
    return be64(path, 48) + index * 8


def snapshot_entry(path: Path) -> int:
    return be64(path, 64)  # header snapshots_offset: the first entry


def qemu_check(path: Path, *options: str) -> tuple[int, dict]:
    result = qemu_img("check", *options, "--output=json", path, check=False)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}


def assert_as_qemu(path: Path, message: str, status: int = 2) -> CheckResult:
    """pyhv's numbers and exit status are qemu-img's, and pyhv prints qemu-img's line."""
    qemu_status, expected = qemu_check(path)
    result = check_image(str(path))
    assert qemu_status == status, expected
    assert (result.exit_status, result.to_json()) == (qemu_status, expected), result.messages
    assert any(message in line for line in result.messages), result.messages
    return result


def assert_repair_as_qemu(path: Path) -> None:
    """`check -r all` by pyhv and by qemu-img on twin copies: same repair numbers, both clean."""
    twin = path.with_name("twin.qcow2")
    shutil.copy(path, twin)
    _, expected = qemu_check(twin, "-r", "all")
    result = check_image(str(path), repair="all")
    assert result.to_json() | {"filename": ""} == expected | {"filename": ""}, result.messages
    assert result.exit_status == 0 and qemu_check(path)[0] == 0
    # The same L2 table afterwards (qemu-img also discards the freed cluster; pyhv leaves it).
    l2 = be64(path, l1_slot(path)) & OFFSET_MASK
    assert l2 == be64(twin, l1_slot(twin)) & OFFSET_MASK
    with open(path, "rb") as mine, open(twin, "rb") as theirs:
        mine.seek(l2)
        theirs.seek(l2)
        assert mine.read(4096) == theirs.read(4096)


# -- builders -------------------------------------------------------------------------------------


def plain(path: Path, *options: str) -> Path:
    create(path, "4M", *options)
    qemu_io(path, "write -P 1 0 128k")
    return path


def extended(path: Path) -> Path:
    return plain(path, "extended_l2=on")


def with_snapshot(path: Path) -> Path:
    plain(path)
    qemu_img("snapshot", "-c", "s1", path)
    return path


# -- L1 entries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 1, 8, 56, 62])
def test_l1_entry_reserved_bits(tmp_path: Path, bit: int) -> None:
    path = plain(tmp_path / "l1.qcow2")
    poke64(path, l1_slot(path), be64(path, l1_slot(path)) | 1 << bit)
    assert_as_qemu(path, "ERROR found L1 entry with reserved bits set")


def test_l1_entry_naming_an_unaligned_l2_table_is_reported_once_and_not_followed(tmp_path: Path) -> None:
    path = plain(tmp_path / "l1.qcow2")
    poke64(path, l1_slot(path), be64(path, l1_slot(path)) | 0x200)
    result = check_image(str(path))
    lines = [line for line in result.messages if "Table is not cluster aligned; L1 entry corrupted" in line]
    assert len(lines) == 1 and result.exit_status == 2, result.messages
    # Not followed: nothing read from the misaligned "table" (qemu-img reports 129 errors here).
    assert result.corruptions == 1 and not any("l2 entry" in line for line in result.messages)
    assert result.leaks == 3  # the real L2 table and its two data clusters look unused
    # And no repair lowers their refcounts: the entry, once corrected, still needs them.
    before = path.read_bytes()
    repaired = check_image(str(path), repair="all")
    assert path.read_bytes() == before and repaired.leaks == 3 and repaired.leaks_fixed == 0
    assert any(line.startswith("Not repairing refcounts") for line in repaired.messages)


def test_snapshot_l1_entry_reserved_bits(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "snap.qcow2")
    slot = be64(path, snapshot_entry(path))
    poke64(path, slot, be64(path, slot) | 1 << 57)
    assert_as_qemu(path, "ERROR found L1 entry with reserved bits set")


# -- standard L2 entries --------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [1, 8, 56, 61])
def test_l2_entry_reserved_bits(tmp_path: Path, bit: int) -> None:
    path = plain(tmp_path / "l2.qcow2")
    poke64(path, l2_slot(path), be64(path, l2_slot(path)) | 1 << bit)
    assert_as_qemu(path, "ERROR found l2 entry with reserved bits set")


@pytest.mark.parametrize("bit", [1, 56])
def test_unallocated_l2_entry_reserved_bits(tmp_path: Path, bit: int) -> None:
    path = plain(tmp_path / "l2.qcow2")
    poke64(path, l2_slot(path, 10), 1 << bit)  # entry 10 maps nothing
    assert_as_qemu(path, f"ERROR found l2 entry with reserved bits set: {1 << bit:x}")


def test_l2_reserved_bits_in_a_table_shared_with_a_snapshot_count_per_l1_naming_it(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "snap.qcow2")
    poke64(path, l2_slot(path), be64(path, l2_slot(path)) | 1 << 5)
    result = assert_as_qemu(path, "ERROR found l2 entry with reserved bits set")
    assert result.corruptions >= 2  # walked from the active and from the snapshot L1 table


@pytest.mark.parametrize("rule", ["reserved bit", "unaligned data cluster", "unaligned preallocated"])
def test_rules_in_an_l2_table_only_a_snapshot_names(tmp_path: Path, rule: str) -> None:
    path = with_snapshot(tmp_path / "snap.qcow2")
    qemu_io(path, "write -P 2 0 64k")  # copy-on-write: the active L1 now names a new L2 table
    snapshot_l2 = be64(path, be64(path, snapshot_entry(path))) & OFFSET_MASK
    assert snapshot_l2 != be64(path, l1_slot(path)) & OFFSET_MASK
    change, line = {
        "reserved bit": (1 << 58, "ERROR found l2 entry with reserved bits set"),
        "unaligned data cluster": (0x200, "Data cluster is not properly aligned"),
        "unaligned preallocated": (0x200 | ZERO, "Preallocated cluster is not properly aligned"),
    }[rule]
    poke64(path, snapshot_l2, be64(path, snapshot_l2) | change)
    assert_as_qemu(path, line)


def test_unaligned_data_cluster(tmp_path: Path) -> None:
    path = plain(tmp_path / "data.qcow2")
    poke64(path, l2_slot(path), be64(path, l2_slot(path)) | 0x200)
    result = assert_as_qemu(path, "Data cluster is not properly aligned; L2 entry corrupted.")
    # Counted where qemu-img counts it: the range touches the next cluster too, which is in use.
    assert result.corruptions == 2 and any("refcount=1 reference=2" in line for line in result.messages)


def test_unaligned_preallocated_zero_cluster_is_repaired_into_a_plain_one(tmp_path: Path) -> None:
    path = plain(tmp_path / "zero.qcow2")
    slot = l2_slot(path)
    poke64(path, slot, be64(path, slot) | 0x200 | ZERO)
    assert_as_qemu(path, "ERROR offset=50200: Preallocated cluster is not properly aligned; L2 entry corrupted.")
    assert_repair_as_qemu(path)
    assert be64(path, slot) == ZERO


def test_unaligned_preallocated_zero_cluster_shared_with_a_snapshot_is_repaired_once(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "snap.qcow2")
    slot = l2_slot(path)
    poke64(path, slot, be64(path, slot) | 0x200 | ZERO)
    assert_as_qemu(path, "Preallocated cluster is not properly aligned; L2 entry corrupted.")
    assert_repair_as_qemu(path)


def test_unaligned_preallocated_zero_cluster_in_v2_is_not_repaired(tmp_path: Path) -> None:
    path = plain(tmp_path / "v2.qcow2", "compat=0.10")
    slot = l2_slot(path)
    poke64(path, slot, be64(path, slot) | 0x200 | ZERO)
    entry = be64(path, slot)
    qemu_status, expected = qemu_check(path)
    result = check_image(str(path))
    # One more than qemu-img (the zero flag itself, reserved in v2), the rest as qemu-img.
    assert result.to_json() == expected | {"corruptions": expected["corruptions"] + 1}, result.messages
    repaired = check_image(str(path), repair="all")
    # v2 has no plain zero cluster to turn it into: the entry stays; only the refcount of the
    # cluster the unaligned range touches is repaired, and then the COPIED flag of its entry.
    assert be64(path, slot) == entry and repaired.corruptions_fixed == 2, repaired.messages
    assert repaired.corruptions == 2 and repaired.exit_status == qemu_status == 2


def test_zero_flag_in_a_version_2_image(tmp_path: Path) -> None:
    path = plain(tmp_path / "v2.qcow2", "compat=0.10")
    poke64(path, l2_slot(path), be64(path, l2_slot(path)) | ZERO)
    qemu_status, expected = qemu_check(path)
    result = check_image(str(path))
    assert any("zero flag in a version 2 image" in line for line in result.messages)
    # qemu-img calls it clean; pyhv adds exactly this corruption and counts the cluster as QEMU does.
    assert qemu_status == 0 and result.exit_status == 2
    assert result.to_json() == expected | {"corruptions": 1}, result.messages


# -- extended L2 entries --------------------------------------------------------------------------


def test_extended_l2_subcluster_both_allocated_and_zero(tmp_path: Path) -> None:
    path = extended(tmp_path / "ext.qcow2")
    bitmap = l2_slot(path, 0, 16) + 8
    poke64(path, bitmap, be64(path, bitmap) | 1 << 32)  # subcluster 0 is allocated, now zero too
    assert_as_qemu(path, "ERROR offset=50000: Allocated cluster has corrupted subcluster allocation bitmap")


def test_extended_l2_unallocated_cluster_with_allocated_subclusters(tmp_path: Path) -> None:
    path = extended(tmp_path / "ext.qcow2")
    poke64(path, l2_slot(path, 10, 16) + 8, 1 << 3)
    assert_as_qemu(path, "ERROR: Unallocated cluster has non-zero subcluster allocation map")


def test_extended_l2_bit_0_is_reserved(tmp_path: Path) -> None:
    path = extended(tmp_path / "ext.qcow2")
    poke64(path, l2_slot(path, 0, 16), be64(path, l2_slot(path, 0, 16)) | ZERO)
    qemu_status, expected = qemu_check(path)
    result = check_image(str(path))
    assert qemu_status == 0 and result.exit_status == 2  # stricter than qemu-img
    assert result.to_json() == expected | {"corruptions": 1}, result.messages
    assert any("ERROR found l2 entry with reserved bits set" in line for line in result.messages)


def test_extended_l2_unaligned_preallocated_cluster(tmp_path: Path) -> None:
    path = extended(tmp_path / "ext.qcow2")
    slot = l2_slot(path, 0, 16)
    poke64(path, slot, be64(path, slot) | 0x200)
    poke64(path, slot + 8, ALL_ALLOC << 32)  # every subcluster zero, none allocated
    assert_as_qemu(path, "Preallocated cluster is not properly aligned; L2 entry corrupted.")
    assert_repair_as_qemu(path)
    assert (be64(path, slot), be64(path, slot + 8)) == (0, ALL_ALLOC << 32)


# -- compressed cluster descriptors ---------------------------------------------------------------


def compressed(path: Path, *options: str) -> Path:
    create(path, "4M", *options)
    qemu_io(path, "write -c -P 1 0 64k")
    return path


def test_compressed_with_copied_flag(tmp_path: Path) -> None:
    path = compressed(tmp_path / "c.qcow2")
    poke64(path, l2_slot(path), be64(path, l2_slot(path)) | COPIED)
    assert_as_qemu(path, "copied flag must never be set for compressed clusters")


def test_compressed_with_a_subcluster_bitmap(tmp_path: Path) -> None:
    path = compressed(tmp_path / "c.qcow2", "extended_l2=on")
    poke64(path, l2_slot(path, 0, 16) + 8, 1)
    assert_as_qemu(path, "ERROR compressed cluster 0 with non-zero subcluster allocation bitmap, entry=0x")


def test_compressed_in_an_image_with_an_external_data_file(tmp_path: Path) -> None:
    path = create(tmp_path / "d.qcow2", "4M", f"data_file={tmp_path / 'd.raw'}")
    qemu_io(path, "write -P 1 0 64k")  # allocates the L2 table in the qcow2 file
    poke64(path, l2_slot(path, 1), COMPRESSED | 5 * 0x10000)
    assert_as_qemu(path, "ERROR compressed cluster 1 with data file, entry=0x")


# -- the refcount table ---------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 4, 8])
def test_refcount_table_entry_reserved_bits(tmp_path: Path, bit: int) -> None:
    path = plain(tmp_path / "r.qcow2")
    poke64(path, reftable_slot(path), be64(path, reftable_slot(path)) | 1 << bit)
    assert_as_qemu(path, "ERROR refcount table entry 0 has reserved bits set")
    # Only a new refcount structure repairs it (qemu-img rebuilds too).
    assert check_image(str(path), repair="all").exit_status == 0
    assert qemu_check(path)[0] == 0


@pytest.mark.parametrize("bit,status", [(56, 2), (62, 2), (63, 1)])
def test_refcount_table_entry_high_bits_are_offset_bits(tmp_path: Path, bit: int, status: int) -> None:
    """qcow2.rst: bits 9-63 are the offset, so a high bit names a block far outside the file;
    past 2^63 qemu-img cannot even try to read it (one check error per cluster, exit 1)."""
    path = plain(tmp_path / "r.qcow2")
    poke64(path, reftable_slot(path), be64(path, reftable_slot(path)) | 1 << bit)
    assert_as_qemu(path, "ERROR refcount block 0 is outside image", status=status)


def test_unaligned_refcount_block(tmp_path: Path) -> None:
    path = plain(tmp_path / "r.qcow2")
    poke64(path, reftable_slot(path), be64(path, reftable_slot(path)) | 0x200)
    result = assert_as_qemu(path, "is not cluster aligned; refcount table entry corrupted", status=1)
    assert result.check_errors == 7  # one per cluster whose refcount cannot be read, as qemu-img
    # qemu-img's own -r all fails here ("ERROR writing refblock"); pyhv rebuilds the structure.
    repaired = check_image(str(path), repair="all")
    assert repaired.exit_status == 0 and repaired.corruptions_fixed >= 1, repaired.messages
    assert qemu_check(path)[0] == 0


def test_cli_exit_status_and_report_for_an_unaligned_refcount_block(tmp_path: Path) -> None:
    path = plain(tmp_path / "r.qcow2")
    poke64(path, reftable_slot(path), be64(path, reftable_slot(path)) | 0x200)
    result = CliRunner().invoke(main, ["image", "check", str(path)], catch_exceptions=False)
    qemu = qemu_img("check", path, check=False)
    assert result.exit_code == qemu.returncode == 1
    assert result.stdout == qemu.stdout  # "1 errors were found ... 7 internal errors have occurred"
    assert "ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted" in result.stderr


def test_refcount_block_shared_with_data(tmp_path: Path) -> None:
    path = plain(tmp_path / "r.qcow2")
    data = be64(path, l2_slot(path)) & OFFSET_MASK
    poke64(path, reftable_slot(path, 1), data)  # block 1 (clusters 32768-) in a data cluster
    assert_as_qemu(path, "ERROR refcount block 1 refcount=2")
    repaired = check_image(str(path), repair="all")
    assert repaired.exit_status == 0, repaired.messages
    assert qemu_check(path)[0] == 0 and be64(path, data) != 0  # the data cluster is untouched


# -- the snapshot table ---------------------------------------------------------------------------


def test_snapshot_l1_table_unaligned(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "s.qcow2")
    entry = snapshot_entry(path)
    poke64(path, entry, be64(path, entry) | 0x200)
    assert_as_qemu(path, "ERROR snapshot 1 (s1) l1_offset=0x")


def test_snapshot_l1_table_too_large(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "s.qcow2")
    poke(path, snapshot_entry(path) + 8, struct.pack(">I", (32 * MIB) // 8 + 1))
    assert_as_qemu(path, "ERROR snapshot 1 (s1) l1_size=0x400001: L1 table is too large")


def test_snapshot_extra_data_shorter_than_16_bytes_in_v3(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "s.qcow2")
    entry = snapshot_entry(path)
    with open(path, "rb") as f:
        f.seek(entry)
        fixed = f.read(40)
        id_size, name_size, extra_size = *struct.unpack(">HH", fixed[12:16]), struct.unpack(">I", fixed[36:40])[0]
        f.seek(entry + 40 + extra_size)
        names = f.read(id_size + name_size)
    # Keep only the first 8 bytes of extra data (vm_state_size_large), then the id and the name.
    poke(path, entry + 36, struct.pack(">I", 8))
    poke(path, entry + 48, names + bytes(extra_size - 8))
    assert_as_qemu(path, "ERROR snapshot table entry 0 is incomplete")


def test_snapshot_extra_data_over_1024_bytes_stops_the_check(tmp_path: Path) -> None:
    path = with_snapshot(tmp_path / "s.qcow2")
    poke(path, snapshot_entry(path) + 36, struct.pack(">I", 1025))
    qemu_status = qemu_check(path)[0]
    result = check_image(str(path))
    assert qemu_status == result.exit_status == 1 and result.check_errors == 1, result.messages
    assert (result.corruptions, result.leaks) == (0, 0)
    assert any("Too much extra metadata in snapshot table entry 0" in line for line in result.messages)
    before = path.read_bytes()
    assert check_image(str(path), repair="all").exit_status == 1 and path.read_bytes() == before


def test_snapshots_in_an_image_with_an_external_data_file(tmp_path: Path) -> None:
    path = create(tmp_path / "d.qcow2", "4M", f"data_file={tmp_path / 'd.raw'}")
    qemu_io(path, "write -P 1 0 64k")
    # qemu-img refuses to make one: append a snapshot table naming the active L1 table.
    cluster = 1 << 16
    table = -(-path.stat().st_size // cluster) * cluster
    l1_offset, l1_size = be64(path, 40), struct.unpack(">I", path.read_bytes()[36:40])[0]
    entry = struct.pack(">QIHHIIQII", l1_offset, l1_size, 1, 2, 0, 0, 0, 0, 24) + bytes(24) + b"1s1"
    poke(path, table, entry.ljust(cluster, b"\0"))
    poke(path, 60, struct.pack(">IQ", 1, table))  # nb_snapshots, snapshots_offset
    assert_as_qemu(path, "ERROR 1 snapshots in image with data file")


# -- fuzz: random bit flips in the tables ---------------------------------------------------------


def table_words(path: Path) -> dict[str, list[int]]:
    """File offsets of every 64-bit word of the L1, L2, refcount and snapshot tables."""
    cluster = 1 << struct.unpack(">I", path.read_bytes()[20:24])[0]
    l1 = l1_slot(path)
    l2 = be64(path, l1) & OFFSET_MASK
    reftable = be64(path, 48)
    words = {
        "L1": [l1 + 8 * i for i in range(2)],
        "L2": [l2 + 8 * i for i in range(4)],
        "refcount table": [reftable + 8 * i for i in range(2)],
        "refcount block": [(be64(path, reftable) & ~0x1FF) + 8 * i for i in range(2)],
    }
    if be64(path, 60) >> 32:  # nb_snapshots
        entry = snapshot_entry(path)
        words["snapshot"] = [entry + 8 * i for i in range(6)]
        words["snapshot L1"] = [be64(path, entry)]
    assert all(offset % cluster < cluster for offsets in words.values() for offset in offsets)
    return words


def qemu_corruptions(path: Path) -> int | None:
    status, data = qemu_check(path)
    if status not in (0, 2, 3) or not data or data.get("check-errors"):
        return None  # qemu-img could not check it: nothing to compare with
    return int(data.get("corruptions", 0))


def version_2(path: Path) -> Path:
    plain(path, "compat=0.10")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 2 64k 64k")  # copy-on-write after the snapshot: refcounts 1 and 2
    return path


SEEDS: dict[str, Callable[[Path], Path]] = {
    "plain": plain,
    "version 2": version_2,
    "extended": extended,
    "snapshot": with_snapshot,
    "compressed": compressed,
}


# PYHV_CHECK_FLIPS=2000 for a deeper pass.
@pytest.mark.parametrize("seed", range(int(os.environ.get("PYHV_CHECK_FLIPS", "40"))))
def test_bit_flips_never_crash_and_repair_never_makes_it_worse(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    name = sorted(SEEDS)[seed % len(SEEDS)]
    path = SEEDS[name](tmp_path / "seed.qcow2")
    words = table_words(path)
    for _ in range(rng.randint(1, 3)):
        offset = rng.choice(words[rng.choice(sorted(words))])
        poke64(path, offset, be64(path, offset) ^ 1 << rng.randrange(64))
    try:
        result = check_image(str(path))
    except ImageError as error:  # refusing the image is fine, in one line
        assert "\n" not in str(error)
        return
    assert result.exit_status in (0, 1, 2, 3)
    before = qemu_corruptions(path)
    try:
        check_image(str(path), repair="all")
    except ImageError as error:
        assert "\n" not in str(error)
        return
    after = qemu_corruptions(path)
    if before is not None and after is not None:
        assert after <= before, (name, seed, result.messages)
