"""Staged image creation (staging.py): temporaries, stale cleanup, what stays in place."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path

import pytest
from qcow2_oracle import KIB, MIB, check_clean, create, needs_qemu, qemu_io, to_raw

from hypervisor.block.locking import lock_image
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2, create_raw
from hypervisor.block.qcow2.staging import remove_stale, staged, staging_prefix
from hypervisor.block.tools import copying
from hypervisor.errors import ConfigError, ImageError, ImageLockedError

pytestmark = needs_qemu


def _stale(folder: Path, target: str, purpose: str = "create", suffix: str = "x1y2z3") -> Path:
    path = folder / (staging_prefix(str(folder / target), purpose) + suffix)
    path.write_bytes(b"half an image")
    return path


def test_stale_temporaries_of_the_same_target_are_removed(tmp_path: Path) -> None:
    mine = _stale(tmp_path, "out.qcow2")
    other_target = _stale(tmp_path, "other.qcow2")
    lookalike = tmp_path / ".pyhv-createout.qcow2.x"
    lookalike.write_bytes(b"not ours")
    create_qcow2(str(tmp_path / "out.qcow2"), Qcow2CreateOptions(size=1 * MIB))
    check_clean(tmp_path / "out.qcow2")
    assert not mine.exists()
    assert other_target.exists() and lookalike.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.qcow2", other_target.name, lookalike.name])


def test_a_temporary_in_use_is_left_alone(tmp_path: Path) -> None:
    flocked = _stale(tmp_path, "out.img", suffix="aaaaaa")
    qemu_locked = _stale(tmp_path, "out.img", suffix="bbbbbb")
    fd_flock = os.open(flocked, os.O_RDONLY)
    fd_qemu = os.open(qemu_locked, os.O_RDWR)
    try:
        fcntl.flock(fd_flock, fcntl.LOCK_SH)  # a pyhv run still building it
        lock_image(fd_qemu, str(qemu_locked), writable=True)  # or QEMU has it open
        assert remove_stale(str(tmp_path), staging_prefix(str(tmp_path / "out.img"), "create")) == []
        create_raw(str(tmp_path / "out.img"), 64 * KIB)
        assert flocked.exists() and qemu_locked.exists()
    finally:
        os.close(fd_flock)
        os.close(fd_qemu)
    create_raw(str(tmp_path / "out.img"), 64 * KIB)
    assert not flocked.exists() and not qemu_locked.exists()


def test_a_symlinked_temporary_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / (staging_prefix(str(tmp_path / "out.img"), "create") + "link00")
    link.symlink_to(victim)
    create_raw(str(tmp_path / "out.img"), 64 * KIB)
    assert victim.read_bytes() == b"keep me" and link.is_symlink()


def test_replacing_keeps_mode_and_follows_symlinks(tmp_path: Path) -> None:
    real = create(tmp_path / "real.qcow2", 64 * KIB)
    os.chmod(real, 0o640)
    link = tmp_path / "link.qcow2"
    link.symlink_to("real.qcow2")
    create_qcow2(str(link), Qcow2CreateOptions(size=2 * MIB))
    assert link.is_symlink()
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640
    assert os.stat(real).st_size > 0 and check_clean(real)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pyhv-")] == []


def test_hard_linked_target_is_overwritten_in_place(tmp_path: Path) -> None:
    target = create(tmp_path / "a.qcow2", 64 * KIB)
    os.link(target, tmp_path / "b.qcow2")
    inode = os.stat(target).st_ino
    create_qcow2(str(target), Qcow2CreateOptions(size=3 * MIB))
    assert os.stat(target).st_ino == inode
    assert os.stat(tmp_path / "b.qcow2").st_ino == inode  # both names still show the new image
    check_clean(tmp_path / "b.qcow2")


def test_target_in_use_is_refused_and_kept(tmp_path: Path) -> None:
    target = create(tmp_path / "busy.qcow2", 1 * MIB)
    qemu_io(target, "write -P 0x5a 0 64k")
    before = target.read_bytes()
    fd = os.open(target, os.O_RDWR)
    try:
        lock_image(fd, str(target), writable=True)
        with pytest.raises(ImageLockedError):
            create_qcow2(str(target), Qcow2CreateOptions(size=2 * MIB))
    finally:
        os.close(fd)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["busy.qcow2"]


def test_failed_convert_leaves_old_target_and_no_temporary(tmp_path: Path) -> None:
    source = create(tmp_path / "src.qcow2", 1 * MIB)
    qemu_io(source, "write -P 0x42 0 100k")
    target = tmp_path / "out.img"
    target.write_bytes(b"old contents")

    def broken_progress(done: int, total: int) -> None:
        raise ImageError("disk full (simulated)")

    with pytest.raises(ImageError, match="simulated"):
        copying.convert(str(source), str(target), None, "qcow2", False, {}, progress=broken_progress)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.img", "src.qcow2"]
    copying.convert(str(source), str(target), None, "raw", False, {})
    assert target.read_bytes() == to_raw(source, tmp_path / "check.raw")
    assert os.stat(target).st_blocks * 512 < 1 * MIB  # still sparse after the rename


@pytest.mark.parametrize("target_format", ["raw", "qcow2"])
def test_unsafe_convert_makes_the_same_image_without_syncing_a_raw_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_format: str
) -> None:
    source = create(tmp_path / "src.qcow2", 1 * MIB)
    qemu_io(source, "write -P 0x42 0 100k", "write -P 0x17 512k 64k")
    syncs: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append("fdatasync"), real_fdatasync(fd))[1])
    target = tmp_path / f"out.{target_format}"
    copying.convert(str(source), str(target), None, target_format, False, {}, cache="unsafe")
    unsafe_syncs, syncs[:] = list(syncs), []
    durable = tmp_path / f"durable.{target_format}"
    copying.convert(str(source), str(durable), None, target_format, False, {})
    # writeback syncs the image, then the file before the rename, then the folder.
    assert syncs.count("fsync") >= 2
    if target_format == "raw":
        assert unsafe_syncs == []  # qemu-img's convert default makes no sync either
        assert target.read_bytes() == durable.read_bytes() == to_raw(source, tmp_path / "check.raw")
    else:  # the qcow2 engine's ordered metadata flush keeps its syncs; only the rename's go
        assert len(unsafe_syncs) < len(syncs)
        check_clean(target)
        assert to_raw(target, tmp_path / "a.raw") == to_raw(source, tmp_path / "b.raw")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pyhv-")) == []


def test_convert_refuses_cache_modes_it_cannot_honour(tmp_path: Path) -> None:
    source = create(tmp_path / "src.qcow2", 1 * MIB)
    for mode in ("none", "directsync", "writethrough", "Unsafe"):
        with pytest.raises(ConfigError, match=f"Cache mode '{mode}' is not supported"):
            copying.convert(str(source), str(tmp_path / "out.raw"), None, "raw", False, {}, cache=mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.qcow2"]


def test_missing_folder_names_the_target(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Could not create .*nowhere/out.qcow2"):
        create_qcow2(str(tmp_path / "nowhere" / "out.qcow2"), Qcow2CreateOptions(size=1 * MIB))


def test_writable_file_in_a_folder_without_write_permission_is_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = create(tmp_path / "out.qcow2", 64 * KIB)
    inode = os.stat(target).st_ino

    def no_new_files(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")  # what mkstemp meets in a 0555 folder

    monkeypatch.setattr(tempfile, "mkstemp", no_new_files)
    create_qcow2(str(target), Qcow2CreateOptions(size=1 * MIB))
    assert os.stat(target).st_ino == inode
    check_clean(target)
    with pytest.raises(ImageError, match="Permission denied"):
        create_qcow2(str(tmp_path / "new.qcow2"), Qcow2CreateOptions(size=1 * MIB))


def test_stage_removes_its_temporary_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staged(str(tmp_path / "out.img"), "convert") as stage:
        assert Path(stage.path).exists() and not stage.in_place
        raise RuntimeError("builder failed")
    assert list(tmp_path.iterdir()) == []


def test_commit_removes_temporaries_of_interrupted_commits(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    top = create(tmp_path / "top.qcow2", 1 * MIB, backing=Path("base.qcow2"))
    qemu_io(top, "write -P 0x17 0 64k")
    legacy = tmp_path / ".pyhv-commit-k3j_x9a2"  # the name older pyhv versions used
    legacy.write_bytes(b"QFI\xfb")
    current = _stale(tmp_path, "top.qcow2", purpose="commit")
    unrelated = tmp_path / ".pyhv-commit-notmine.txt"
    unrelated.write_bytes(b"keep")
    assert copying.commit(str(top), None, keep_overlay=False)
    assert not legacy.exists() and not current.exists() and unrelated.exists()
    check_clean(top)
    check_clean(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a file to another owner")
def test_replacing_keeps_the_owner(tmp_path: Path) -> None:
    target = create(tmp_path / "owned.qcow2", 64 * KIB)
    os.chown(target, 4321, 4321)
    create_qcow2(str(target), Qcow2CreateOptions(size=1 * MIB))
    info = os.stat(target)
    assert (info.st_uid, info.st_gid) == (4321, 4321)
