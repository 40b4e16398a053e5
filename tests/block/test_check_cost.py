"""`pyhv image check` costs what the metadata costs, not what the file's length is (issue 14).

Each check runs in a child process with an address-space limit and a timeout generous enough for a
busy two-core host; the child reports its own peak RSS. Before the sparse refcount walk, the
100 GiB case ran past 600 s and 1.6 GB, the 1 TiB one took 15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.block.qcow2_oracle import create, needs_qemu, qemu_img, qemu_io

GIB = 1 << 30
# A bound for a regression, not a benchmark: the checks below take about half a second here.
CHILD_TIMEOUT = 100  # below pytest-timeout's 120 s, so a regression shows as this timeout
ADDRESS_SPACE_LIMIT = 2 * GIB
RSS_LIMIT_KIB = 200 * 1024

CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from hypervisor.block.qcow2.check import check_image
result = check_image(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
print(json.dumps({{"check": result.to_json(), "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def bounded_check(path: Path, repair: str | None = None) -> tuple[dict, int]:
    """(check JSON, peak RSS in KiB) of a check run in a child with bounded memory and time."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(limit=ADDRESS_SPACE_LIMIT), str(path), *([repair] if repair else [])],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return data["check"], data["rss_kib"]


def qemu_check_json(path: Path) -> dict:
    return json.loads(qemu_img("check", "--output=json", path, check=False).stdout)


def sparse_tail(path: Path, length: int) -> None:
    os.truncate(path, length)
    assert os.stat(path).st_blocks * 512 < 64 << 20, "the tail must be a hole (the file system is not sparse)"


@needs_qemu
def test_small_clusters_with_a_100_gib_hole_after_the_metadata(tmp_path: Path) -> None:
    path = create(tmp_path / "tail.qcow2", "64M", "cluster_size=512")
    qemu_io(path, "write -P 1 0 1M")
    sparse_tail(path, 100 * GIB)
    result, rss = bounded_check(path)
    assert result == qemu_check_json(path)
    assert "corruptions" not in result and "leaks" not in result
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"


@needs_qemu
def test_empty_image_with_a_1_tib_hole(tmp_path: Path) -> None:
    path = create(tmp_path / "empty.qcow2", "1G")
    sparse_tail(path, 1 << 40)
    result, rss = bounded_check(path)
    assert result == qemu_check_json(path)
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"


@needs_qemu
@pytest.mark.parametrize("refcount_bits", [1, 4, 16, 64])
def test_leaks_in_a_far_refcount_block_are_found_without_walking_the_hole(tmp_path: Path, refcount_bits: int) -> None:
    """A refcount block that claims clusters deep inside the hole: every claimed cluster is a
    leak, counted exactly, and the walk still only touches the populated block."""
    path = create(tmp_path / "far.qcow2", "64M", f"refcount_bits={refcount_bits}")
    sparse_tail(path, 64 * GIB)
    with open(path, "rb") as f:
        header = f.read(104)
    table = int.from_bytes(header[48:56], "big")
    cluster_size = 1 << int.from_bytes(header[20:24], "big")
    per_block = cluster_size * 8 // refcount_bits
    far_block_index = (32 * GIB // cluster_size) // per_block
    entry_offset = table + 8 * far_block_index
    if entry_offset + 8 > table + cluster_size:
        pytest.skip("the refcount table's first cluster does not reach that far with this width")
    block_offset = 48 * GIB  # inside the hole, cluster aligned
    with open(path, "r+b") as f:
        f.seek(entry_offset)
        f.write(block_offset.to_bytes(8, "big"))
        f.seek(block_offset)
        f.write(b"\x01" * 64)  # a few non-zero refcounts at the start of the block
    expected = qemu_check_json(path)
    result, rss = bounded_check(path)
    assert result == expected
    assert result["leaks"] > 0
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"


@needs_qemu
def test_rebuilding_refcounts_after_a_far_refcount_block_writes_only_the_blocks_in_use(tmp_path: Path) -> None:
    """`check -r all` puts the new structure after the old one; when an old refcount block sits
    48 GiB into a hole, the new table must describe 100 million clusters, but only the blocks
    with a refcount are written. Before, every block up to there was built and written (the fuzz
    tests found this as a hang)."""
    path = create(tmp_path / "rebuild.qcow2", "64M", "cluster_size=512", "refcount_bits=1")
    qemu_io(path, "write -P 1 0 256k")
    sparse_tail(path, 64 * GIB)
    with open(path, "rb") as f:
        header = f.read(104)
        table = int.from_bytes(header[48:56], "big")
        f.seek(table)
        first_block = int.from_bytes(f.read(8), "big")
    with open(path, "r+b") as f:
        f.seek(table + 8)
        f.write((48 * GIB).to_bytes(8, "big"))  # refcount block 1: all zeros, far into the hole
        f.seek(first_block)
        f.write(b"\0" * 8)  # the first 64 clusters (header, tables, data): refcount 0, too low
    result, rss = bounded_check(path, "all")
    assert "corruptions" not in result and "leaks" not in result, result
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss} KiB"
    assert os.stat(path).st_blocks * 512 < 64 << 20, "the repair filled the hole"
    assert qemu_check_json(path).get("corruptions", 0) == 0
