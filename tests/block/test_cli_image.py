"""`pyhv image` commands against qemu-img: same JSON and text, results qemu-img accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io (qemu-utils) not installed",
)


def pyhv(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["image", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args)


def qemu_io(path: Path, *commands: str) -> None:
    args = ["qemu-io"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, str(path))
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result.stdout + result.stderr


@pytest.fixture()
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small zoo made by qemu: data, compressed and zero clusters, snapshots, a chain."""
    monkeypatch.chdir(tmp_path)
    assert qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "16M").returncode == 0
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 4M", "write -c -P 2 8M 64k", "write -z 9M 64k")
    assert qemu_img("snapshot", "-c", "s1", "base.qcow2").returncode == 0
    qemu_io(tmp_path / "base.qcow2", "write -P 5 0 64k")
    (tmp_path / "sub").mkdir()
    assert (
        qemu_img("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/overlay.qcow2").returncode
        == 0
    )
    qemu_io(tmp_path / "sub/overlay.qcow2", "write -P 3 1M 1M", "write -z 2M 64k")
    assert qemu_img("create", "-q", "-f", "raw", "disk.raw", "4M").returncode == 0
    qemu_io(tmp_path / "disk.raw", "write -P 4 0 1M")
    return tmp_path


FILES = ["base.qcow2", "sub/overlay.qcow2", "disk.raw"]


@pytest.mark.parametrize("name", FILES)
def test_info_json_and_text_equal_qemu_img(images: Path, name: str) -> None:
    for extra in ([], ["--backing-chain"]):
        status, out, err = pyhv("info", "--output=json", *extra, name)
        assert status == 0, err
        assert json.loads(out) == json.loads(qemu_img("info", "--output=json", *extra, name).stdout)
        status, out, _ = pyhv("info", *extra, name)
        assert out == qemu_img("info", *extra, name).stdout


@pytest.mark.parametrize("name", FILES)
def test_map_json_equals_qemu_img(images: Path, name: str) -> None:
    status, out, err = pyhv("map", "--output=json", name)
    assert status == 0, err
    ours = json.loads(out)
    assert all(isinstance(entry.pop("compressed"), bool) for entry in ours)  # QEMU >= 8.2 adds it
    assert ours == json.loads(qemu_img("map", "--output=json", name).stdout)


def test_map_human_equals_qemu_img(images: Path) -> None:
    # Human output stops at compressed clusters, with qemu-img's status 1.
    for name in ("sub/overlay.qcow2", "disk.raw", "base.qcow2"):
        status, out, _ = pyhv("map", name)
        theirs = qemu_img("map", name)
        assert (status, out) == (theirs.returncode, theirs.stdout)


def test_check_json_equals_qemu_img(images: Path) -> None:
    for name in ("base.qcow2", "sub/overlay.qcow2"):
        status, out, _ = pyhv("check", "--output=json", name)
        theirs = qemu_img("check", "--output=json", name)
        assert status == theirs.returncode == 0
        assert json.loads(out) == json.loads(theirs.stdout)
        assert pyhv("check", name)[1] == qemu_img("check", name).stdout


def test_check_statuses_leaks_and_repair(images: Path) -> None:
    path = images / "base.qcow2"
    clusters = path.stat().st_size // 65536
    with open(path, "r+b") as f:  # refcount 1 for a cluster nothing uses: a leak
        f.truncate((clusters + 1) * 65536)
        f.seek(48)
        table = int.from_bytes(f.read(8), "big")
        f.seek(table)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 2 * clusters)
        f.write((1).to_bytes(2, "big"))
    assert qemu_img("check", str(path)).returncode == 3
    status, out, err = pyhv("check", "--output=json", "base.qcow2")
    assert status == 3 and json.loads(out)["leaks"] == 1 and "Leaked cluster" in err
    status, out, _ = pyhv("check", "-r", "leaks", "--output=json", "base.qcow2")
    assert status == 0 and json.loads(out)["leaks-fixed"] == 1
    assert qemu_img("check", str(path)).returncode == 0
    assert pyhv("check", "disk.raw")[0] == 63  # qemu-img: format does not support checks


def test_check_of_a_corrupted_image_exits_2_and_repair_all_fixes_it(images: Path) -> None:
    path = images / "sub/overlay.qcow2"
    with open(path, "r+b") as f:  # zero the whole refcount block: every cluster "free" but in use
        f.seek(48)
        table = int.from_bytes(f.read(8), "big")
        f.seek(table)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block)
        f.write(bytes(65536))
    status, _, err = pyhv("check", "sub/overlay.qcow2")
    assert status == 2 and "ERROR cluster" in err
    status, out, _ = pyhv("check", "-r", "all", "sub/overlay.qcow2")
    assert status == 0, out
    assert "Rebuilding refcount structure" in _
    assert qemu_img("check", str(path)).returncode == 0


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["-c"],
        ["-o", "cluster_size=4096,compat=0.10"],
        ["-o", "extended_l2=on,refcount_bits=1"],
        ["-c", "-o", "compression_type=zstd"],
    ],
)
def test_convert_to_qcow2_opens_cleanly_in_qemu(images: Path, options: list[str]) -> None:
    status, _, err = pyhv("convert", "-O", "qcow2", *options, "sub/overlay.qcow2", "out.qcow2")
    assert status == 0, err
    assert qemu_img("check", "out.qcow2").returncode == 0
    assert qemu_img("compare", "sub/overlay.qcow2", "out.qcow2").returncode == 0
    info = json.loads(qemu_img("info", "--output=json", "out.qcow2").stdout)
    assert "backing-filename" not in info
    if "-c" in options:
        report = json.loads(qemu_img("check", "--output=json", "out.qcow2").stdout)
        assert report["compressed-clusters"] > 0


def test_convert_raw_snapshot_and_progress(images: Path) -> None:
    status, out, err = pyhv("convert", "-p", "-O", "raw", "-l", "snapshot.name=s1", "base.qcow2", "s1.raw")
    assert status == 0, err
    assert "100.00/100%" in out
    assert qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", "base.qcow2", "ref.raw").returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "raw", "s1.raw", "ref.raw").returncode == 0
    assert (images / "s1.raw").stat().st_blocks * 512 < 8 << 20  # sparse: zeros were not written


def test_create_prints_and_makes_what_qemu_makes(images: Path) -> None:
    status, out, _ = pyhv("create", "-f", "qcow2", "-o", "cluster_size=64k", "new.qcow2", "1G")
    assert status == 0
    assert out.strip() == (
        "Formatting 'new.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off "
        "compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
    )
    assert qemu_img("create", "-q", "-f", "qcow2", "ref.qcow2", "1G").returncode == 0
    assert (images / "new.qcow2").read_bytes() == (images / "ref.qcow2").read_bytes()
    # Size from the backing file, backing name kept relative to the overlay's folder.
    status, _, err = pyhv("create", "-q", "-f", "qcow2", "-b", "overlay.qcow2", "-F", "qcow2", "sub/top.qcow2")
    assert status == 0, err
    info = json.loads(qemu_img("info", "--output=json", "sub/top.qcow2").stdout)
    assert info["virtual-size"] == 16 << 20 and info["full-backing-filename"] == "sub/overlay.qcow2"
    assert qemu_img("compare", "sub/top.qcow2", "sub/overlay.qcow2").returncode == 0


def test_snapshot_commands(images: Path) -> None:
    assert pyhv("snapshot", "-c", "mine", "base.qcow2")[0] == 0
    qemu_io(images / "base.qcow2", "write -P 8 0 1M")
    status, out, _ = pyhv("snapshot", "-l", "base.qcow2")
    assert status == 0 and "mine" in out and "s1" in out
    assert out.splitlines()[1] == qemu_img("snapshot", "-l", "base.qcow2").stdout.splitlines()[1]
    assert pyhv("snapshot", "-a", "mine", "base.qcow2")[0] == 0
    assert run("qemu-io", "-c", "read -P 5 0 64k", "base.qcow2").stdout.startswith("read")
    assert pyhv("snapshot", "-d", "mine", "base.qcow2")[0] == 0
    assert qemu_img("check", "base.qcow2").returncode == 0
    assert "mine" not in qemu_img("snapshot", "-l", "base.qcow2").stdout


def test_resize_grow_and_shrink(images: Path) -> None:
    assert pyhv("resize", "sub/overlay.qcow2", "+16M") == (0, "Image resized.\n", "")
    assert json.loads(qemu_img("info", "--output=json", "sub/overlay.qcow2").stdout)["virtual-size"] == 32 << 20
    assert pyhv("resize", "--shrink", "sub/overlay.qcow2", "-- -8M".split()[-1])[0] == 0
    assert qemu_img("check", "sub/overlay.qcow2").returncode == 0
    assert pyhv("resize", "disk.raw", "8M")[0] == 0
    assert (images / "disk.raw").stat().st_size == 8 << 20


def test_rebase_safe_keeps_contents_and_unsafe_only_renames(images: Path) -> None:
    assert qemu_img("convert", "-O", "raw", "sub/overlay.qcow2", "before.raw").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "other.qcow2", "16M").returncode == 0
    qemu_io(images / "other.qcow2", "write -P 6 0 8M")
    status, _, err = pyhv("rebase", "-b", "../other.qcow2", "-F", "qcow2", "sub/overlay.qcow2")
    assert status == 0, err
    assert qemu_img("compare", "sub/overlay.qcow2", "before.raw").returncode == 0
    assert qemu_img("check", "sub/overlay.qcow2").returncode == 0
    info = json.loads(qemu_img("info", "--output=json", "sub/overlay.qcow2").stdout)
    assert info["backing-filename"] == "../other.qcow2"
    assert pyhv("rebase", "-u", "-b", "../base.qcow2", "-F", "qcow2", "sub/overlay.qcow2")[0] == 0
    info = json.loads(qemu_img("info", "--output=json", "sub/overlay.qcow2").stdout)
    assert info["backing-filename"] == "../base.qcow2"
    assert pyhv("rebase", "-b", "", "sub/overlay.qcow2")[0] == 0
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", "sub/overlay.qcow2").stdout)


def test_commit_writes_overlay_into_backing(images: Path) -> None:
    assert qemu_img("convert", "-O", "raw", "sub/overlay.qcow2", "before.raw").returncode == 0
    assert pyhv("commit", "sub/overlay.qcow2") == (0, "Image committed.\n", "")
    assert qemu_img("compare", "base.qcow2", "before.raw").returncode == 0
    assert qemu_img("compare", "sub/overlay.qcow2", "before.raw").returncode == 0
    assert qemu_img("check", "base.qcow2").returncode == 0
    overlay_map = json.loads(qemu_img("map", "--output=json", "sub/overlay.qcow2").stdout)
    assert all(entry["depth"] >= 1 or not entry["present"] for entry in overlay_map)  # emptied


def test_compare_statuses(images: Path) -> None:
    assert qemu_img("convert", "-O", "raw", "base.qcow2", "copy.raw").returncode == 0
    assert pyhv("compare", "base.qcow2", "copy.raw") == (0, "Images are identical.\n", "")
    status, out, _ = pyhv("compare", "base.qcow2", "sub/overlay.qcow2")
    assert (status, out) == (1, qemu_img("compare", "base.qcow2", "sub/overlay.qcow2").stdout)
    status, _, err = pyhv("compare", "base.qcow2", "missing.qcow2")
    assert status == 2 and err.count("\n") == 1


def test_convert_from_sparse_raw_keeps_holes_unallocated(images: Path) -> None:
    status, _, err = pyhv("convert", "-f", "raw", "-O", "qcow2", "disk.raw", "fromraw.qcow2")
    assert status == 0, err
    assert qemu_img("compare", "-f", "raw", "disk.raw", "fromraw.qcow2").returncode == 0
    report = json.loads(qemu_img("check", "--output=json", "fromraw.qcow2").stdout)
    assert report["allocated-clusters"] == 16  # the 1 MiB written, in 64 KiB clusters; holes stay holes
