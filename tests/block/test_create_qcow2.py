"""create.py against the oracle: images pyhv creates are byte-identical to qemu-img's where QEMU's
layout is deterministic, and always pass `qemu-img check`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2, create_raw, validate
from hypervisor.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) not installed")


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# (qemu-img -o string, our options) pairs whose files must be byte-identical.
IDENTICAL_CASES = [
    ("", {}),
    ("compat=0.10", {"compat": "0.10"}),
    ("cluster_size=512", {"cluster_size": 512}),
    ("cluster_size=4096", {"cluster_size": 4096}),
    ("cluster_size=2M", {"cluster_size": 2 << 20}),
    ("refcount_bits=1", {"refcount_bits": 1}),
    ("refcount_bits=64", {"refcount_bits": 64}),
    ("lazy_refcounts=on", {"lazy_refcounts": True}),
    ("extended_l2=on", {"extended_l2": True}),
    ("compression_type=zstd", {"compression_type": "zstd"}),
    ("preallocation=metadata,cluster_size=4096", {"preallocation": "metadata", "cluster_size": 4096}),
    (
        "preallocation=metadata,extended_l2=on,cluster_size=16384",
        {"preallocation": "metadata", "extended_l2": True, "cluster_size": 16384},
    ),
]


# Every case at every size, except metadata preallocation of 3 GiB (comparing GiB files is slow;
# test_large_sizes_need_several_refcount_blocks_and_pass_check covers big preallocated images).
SIZES = [0, 1000, 10 << 20, 3 << 30]
CREATE_CASES = [
    pytest.param(qemu_options, options, size, id=f"{qemu_options or 'default'}-{size}")
    for qemu_options, options in IDENTICAL_CASES
    for size in SIZES
    if not (options.get("preallocation") and size > (10 << 20))
]


@pytest.mark.parametrize("qemu_options, options, size", CREATE_CASES)
def test_create_matches_qemu_img_byte_for_byte(tmp_path: Path, qemu_options: str, options: dict, size: int) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_qcow2(str(ours), Qcow2CreateOptions(size=size, **options))
    args = ["create", "-q", "-f", "qcow2"] + (["-o", qemu_options] if qemu_options else [])
    assert qemu_img(*args, str(theirs), str(size)).returncode == 0
    cluster_size = options.get("cluster_size", 65536)
    refcount_bits = options.get("refcount_bits", 16)
    clusters_covered_by_one_block = cluster_size * 8 // refcount_bits
    if size // cluster_size + 8 < clusters_covered_by_one_block:
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        # QEMU grows its L1 table after writing the header and places further refcount blocks
        # as it goes; pyhv plans the layout at once. Both must be valid and describe the same disk.
        assert qemu_img("check", str(ours)).returncode == 0
        ours_info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
        theirs_info = json.loads(qemu_img("info", "--output=json", str(theirs)).stdout)
        for info in (ours_info, theirs_info):
            del info["actual-size"], info["filename"]
        assert ours_info == theirs_info
        assert qemu_img("compare", str(ours), str(theirs)).returncode == 0


def test_backing_file_header_matches_qemu_img(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_qcow2(str(base), Qcow2CreateOptions(size=1 << 20))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_qcow2(str(ours), Qcow2CreateOptions(size=1 << 20, backing_file="base.qcow2", backing_format="qcow2"))
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(theirs)).returncode == 0
    assert ours.read_bytes() == theirs.read_bytes()
    info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"


@pytest.mark.parametrize("cluster_size", [512, 65536])
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_large_sizes_need_several_refcount_blocks_and_pass_check(
    tmp_path: Path, cluster_size: int, refcount_bits: int
) -> None:
    # With 512-byte clusters and metadata preallocation, the refcount structures span many blocks.
    path = tmp_path / "big.qcow2"
    size = (64 << 20) if cluster_size == 512 else (4 << 30)
    create_qcow2(
        str(path),
        Qcow2CreateOptions(size=size, cluster_size=cluster_size, refcount_bits=refcount_bits, preallocation="metadata"),
    )
    result = qemu_img("check", "--output=json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["allocated-clusters"] == report["total-clusters"] == -(-size // cluster_size)
    assert "leaks" not in report and "corruptions" not in report


def test_preallocated_image_reads_as_zeros_in_qemu_io(tmp_path: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    path = tmp_path / "p.qcow2"
    create_qcow2(str(path), Qcow2CreateOptions(size=3 << 20, cluster_size=4096, preallocation="metadata"))
    out = subprocess.run(["qemu-io", "-c", "read -P 0 0 3M", str(path)], capture_output=True, text=True)
    assert "read 3145728/3145728" in out.stdout, out.stdout + out.stderr


BAD_OPTIONS = [
    ({"cluster_size": 1000}, "power of two"),
    ({"cluster_size": 256}, "power of two"),
    ({"cluster_size": 4 << 20}, "power of two"),
    ({"refcount_bits": 3}, "Refcount width"),
    ({"refcount_bits": 128}, "Refcount width"),
    ({"compat": "0.10", "lazy_refcounts": True}, "Lazy refcounts"),
    ({"compat": "0.10", "refcount_bits": 8}, "refcount widths"),
    ({"compat": "0.10", "extended_l2": True}, "Extended L2"),
    ({"compat": "2.0"}, "compatibility level"),
    ({"extended_l2": True, "cluster_size": 4096}, "at least 16384"),
    ({"preallocation": "full"}, "preallocation"),
    ({"compression_type": "lz4"}, "compression type"),
    ({"backing_file": "b.qcow2"}, "without backing format"),
    ({"backing_file": "x" * 1024, "backing_format": "raw"}, "1023"),
    ({"backing_format": "qcow2"}, "without a backing file"),
    ({"size": -1}, "invalid image size"),
    ({"size": 1 << 60}, "too large"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_options_raise_config_error_and_leave_the_file_alone(tmp_path: Path, options: dict, message: str) -> None:
    path = tmp_path / "existing.img"
    path.write_bytes(b"precious data")
    before = sha256(path)
    kwargs = {"size": 1 << 20, **options}
    with pytest.raises(ConfigError, match=message):
        validate(Qcow2CreateOptions(**kwargs))
    with pytest.raises(ConfigError, match=message):
        create_qcow2(str(path), Qcow2CreateOptions(**kwargs))
    assert sha256(path) == before


def test_raw_is_sparse_and_rounded_to_sectors(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    create_raw(str(path), 1000)
    assert path.stat().st_size == 1024
    create_raw(str(path), 1 << 30)
    assert path.stat().st_size == 1 << 30
    assert path.stat().st_blocks * 512 < (1 << 20)
