"""Crash-point sweep of the image tools (issue 14): kill each operation at its Nth write, sync or
rename (crash_points.KillSwitch), then ask `qemu-img check` (no corruption: exit 0 or 3) and
compare what the image shows with the states before and after the operation: it must be one of
the two. Commands that build new files are run again after the kill and must then produce the
clean result and leave no pyhv temporary behind.

Snapshot create and delete are also replayed as power loss (crash_points.power_loss_states):
every prefix of their writes and random subsets of each sync epoch (a disk reordering writes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crash_points import apply_writes, epoch_edges, power_loss_states, record_hostfile, run_killed, sample_points
from qcow2_oracle import KIB, MIB, check_no_corruption, create, needs_qemu, qemu_img, qemu_io

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2, create_raw
from hypervisor.block.tools import copying, images

pytestmark = needs_qemu

# Kill points per operation: all of them when there are fewer, else every sync, truncate and
# rename with the writes on either side (each metadata epoch's edges) and an even sample of the rest.
POINTS = 24
Observer = Callable[[Path], Any]


# -- observing an image ----------------------------------------------------------------------
def _raw_view(path: Path, snapshot: str | None = None) -> bytes:
    out = path.with_name(path.name + ".view")
    args: list[str | Path] = ["convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    result = qemu_img(*args, path, out, check=False)
    if result.returncode:
        return b"unreadable: " + result.stderr.encode()
    data = out.read_bytes()
    out.unlink()
    return data


def image_state(path: Path) -> Any:
    """What a user sees of an image: size, backing file, snapshots and every layer's contents."""
    if not path.exists():
        return None
    result = qemu_img("info", "--output=json", path, check=False)
    if result.returncode:
        return ("unreadable", result.stderr)
    info = json.loads(result.stdout)
    snapshots = [s["name"] for s in info.get("snapshots", [])]
    return (
        info["format"],
        info["virtual-size"],
        info.get("backing-filename"),
        _raw_view(path),
        tuple((name, _raw_view(path, name)) for name in snapshots),
    )


def _readable(state: Any) -> bool:
    return isinstance(state, tuple) and len(state) == 5


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".pyhv-"))


# -- the sweep -------------------------------------------------------------------------------
def sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Callable[[Path], None],
    operation: Callable[[Path], object],
    observe: Observer,
    checked: tuple[str, ...],
    rerun: bool = False,
    final: Observer | None = None,
) -> int:
    """Kill `operation` at each sampled point; returns the number of points it has."""
    template = tmp_path / "template"
    template.mkdir()
    setup(template)
    work = tmp_path / "work"

    def fresh() -> None:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(template, work)

    fresh()
    before = observe(work)
    clean = run_killed(monkeypatch, lambda: operation(work), None)
    after = observe(work)
    final_after = final(work) if final is not None else None
    assert _temporaries(work) == []
    total = len(clean.calls)
    assert total > 2, clean.calls
    for point in sample_points(total, POINTS, epoch_edges(clean.calls)):
        fresh()
        run_killed(monkeypatch, lambda: operation(work), point)
        where = f"killed at call {point} of {total} ({clean.calls[point]})"
        for name in checked:
            if (work / name).exists() and (work / name).read_bytes()[:4] == b"QFI\xfb":
                result = check_no_corruption(work / name)
                assert result.returncode in (0, 3), where
        state = observe(work)
        assert state in (before, after), where
        if rerun:
            operation(work)
            assert observe(work) == after, where + ", then run again"
            if final is not None:
                assert final(work) == final_after, where + ", then run again"
            assert _temporaries(work) == [], where + ", then run again"
    return total


def _qcow2_state(name: str) -> Observer:
    return lambda folder: image_state(folder / name)


# -- snapshots -------------------------------------------------------------------------------
def _snapshot_image(folder: Path) -> None:
    """Several L2 tables (512-byte clusters), data shared with one snapshot and data that is not,
    and a compressed cluster."""
    path = create(folder / "img.qcow2", 256 * KIB, "cluster_size=512")
    qemu_io(path, "write -P 0x11 0 40k", "write -P 0x22 100k 30k")
    qemu_img("snapshot", "-c", "old", path)
    qemu_io(path, "write -P 0x33 20k 40k", "write -P 0x44 200k 8k", "write -c -P 0x55 240k 512")


def _snapshot_op(action: str, name: str) -> Callable[[Path], None]:
    def operation(folder: Path) -> None:  # as `pyhv image snapshot` does it
        image = Qcow2Image.open(str(folder / "img.qcow2"), read_only=False, allow_backing=False)
        try:
            getattr(image, action)(name)
            image.flush()
        finally:
            image.close()

    return operation


@pytest.mark.parametrize(
    ("action", "name"), [("create_snapshot", "new"), ("delete_snapshot", "old"), ("apply_snapshot", "old")]
)
def test_snapshot_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, name: str) -> None:
    sweep(tmp_path, monkeypatch, _snapshot_image, _snapshot_op(action, name), _qcow2_state("img.qcow2"), ("img.qcow2",))


@pytest.mark.parametrize(
    ("action", "name"), [("create_snapshot", "new"), ("delete_snapshot", "old"), ("apply_snapshot", "old")]
)
def test_snapshot_power_loss_in_any_write_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, name: str
) -> None:
    _snapshot_image(tmp_path)
    path = tmp_path / "img.qcow2"
    initial = path.read_bytes()
    before = image_state(path)
    with monkeypatch.context() as patch:
        ops = record_hostfile(patch, str(path))
        _snapshot_op(action, name)(tmp_path)
    after = image_state(path)
    assert before != after and None in ops
    states = list(power_loss_states(ops, seed=len(ops)))
    crash = tmp_path / "crash" / "img.qcow2"
    crash.parent.mkdir()
    for index in sample_points(len(states), POINTS):
        crash.write_bytes(apply_writes(initial, states[index]))
        check_no_corruption(crash)
        assert image_state(crash) in (before, after), f"state {index} of {len(states)}"


# -- create and convert ----------------------------------------------------------------------
def _old_target(folder: Path) -> None:
    path = create(folder / "out.img", 192 * KIB)
    qemu_io(path, "write -P 0x66 0 64k")


@pytest.mark.parametrize(
    "options",
    [
        dict(size=4 * MIB, cluster_size=4096),
        dict(size=2 * MIB, cluster_size=4096, preallocation="metadata"),
        dict(size=1 * MIB, backing_file="base.qcow2", backing_format="qcow2"),
    ],
    ids=["plain", "preallocation-metadata", "backing"],
)
def test_create_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]) -> None:
    def setup(folder: Path) -> None:
        _old_target(folder)
        create(folder / "base.qcow2", 1 * MIB)

    def operation(folder: Path) -> None:
        create_qcow2(str(folder / "out.img"), Qcow2CreateOptions(**options))

    sweep(tmp_path, monkeypatch, setup, operation, _qcow2_state("out.img"), ("out.img",), rerun=True)


def test_create_raw_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep(
        tmp_path,
        monkeypatch,
        _old_target,
        lambda folder: create_raw(str(folder / "out.img"), 3 * MIB),
        _qcow2_state("out.img"),
        (),
        rerun=True,
    )


def _convert_source(folder: Path) -> None:
    _old_target(folder)
    path = create(folder / "src.qcow2", 3 * MIB, "cluster_size=4096")
    qemu_io(path, "write -P 0x77 0 512k", "write -P 0x78 1M 512k", "write -z 2M 512k", "write -P 0x79 3068k 4k")


@pytest.mark.parametrize(
    ("target_format", "compress"),
    [("qcow2", False), ("qcow2", True), ("raw", False)],
    ids=["qcow2", "compressed", "raw"],
)
def test_convert_killed_at_any_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_format: str, compress: bool
) -> None:
    def operation(folder: Path) -> None:
        options = {"cluster_size": "65536"} if target_format == "qcow2" else {}
        copying.convert(str(folder / "src.qcow2"), str(folder / "out.img"), None, target_format, compress, options)

    def observe(folder: Path) -> Any:
        state = image_state(folder / "out.img")
        return state[1:] if _readable(state) else state  # a raw or qcow2 target: compare contents

    sweep(tmp_path, monkeypatch, _convert_source, operation, observe, ("out.img",), rerun=True)


# -- commit, resize, rebase ------------------------------------------------------------------
def _overlay_pair(folder: Path) -> None:
    base = create(folder / "base.qcow2", 1 * MIB, "cluster_size=4096")
    qemu_io(base, "write -P 0x01 0 1M")
    top = create(folder / "top.qcow2", 1 * MIB, "cluster_size=4096", backing=Path("base.qcow2"))
    qemu_io(top, "write -P 0x02 64k 200k", "write -z 512k 64k", "write -P 0x03 900k 4k")


def test_commit_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def final(folder: Path) -> Any:
        return image_state(folder / "base.qcow2"), image_state(folder / "top.qcow2")

    sweep(
        tmp_path,
        monkeypatch,
        _overlay_pair,
        lambda folder: copying.commit(str(folder / "top.qcow2"), None, keep_overlay=False),
        _qcow2_state("top.qcow2"),  # what the guest sees through the overlay never changes
        ("top.qcow2", "base.qcow2"),
        rerun=True,
        final=final,
    )


@pytest.mark.parametrize(("sign", "amount"), [("", 6 * MIB), ("-", 64 * KIB)], ids=["grow", "shrink"])
def test_resize_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sign: str, amount: int) -> None:
    def setup(folder: Path) -> None:  # 512-byte clusters: growing to 6 MiB moves the L1 table
        path = create(folder / "img.qcow2", 1 * MIB, "cluster_size=512")
        qemu_io(path, "write -P 0x21 0 100k", "write -P 0x22 1000k 24k")
        qemu_io(path, "discard 960k 64k")

    sweep(
        tmp_path,
        monkeypatch,
        setup,
        lambda folder: images.resize_image(str(folder / "img.qcow2"), None, sign, amount, shrink=True),
        _qcow2_state("img.qcow2"),
        ("img.qcow2",),
    )


def test_rebase_killed_at_any_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def setup(folder: Path) -> None:
        _overlay_pair(folder)
        other = create(folder / "other.qcow2", 1 * MIB, "cluster_size=4096")
        qemu_io(other, "write -P 0x01 0 300k", "write -P 0x09 300k 100k")

    def observe(folder: Path) -> Any:
        state = image_state(folder / "top.qcow2")
        return state[3] if _readable(state) else state  # the backing name changes, the contents must not

    sweep(
        tmp_path,
        monkeypatch,
        setup,
        lambda folder: copying.rebase(str(folder / "top.qcow2"), None, "other.qcow2", "qcow2", unsafe=False),
        observe,
        ("top.qcow2",),
    )


# -- a real SIGKILL, for a few points (strace fault injection) -------------------------------
ROOT = Path(__file__).resolve().parents[2]
STRACE = shutil.which("strace")


def _pyhv_killed(folder: Path, syscall: str, nth: int, *arguments: str) -> None:
    """Run `pyhv image ...` and have strace SIGKILL it at its `nth` `syscall` (strace(1) -e inject)."""
    assert STRACE is not None
    command = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}"]
    command += ["-e", f"inject={syscall}:signal=KILL:when={nth}", sys.executable, "-m", "hypervisor", "image"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([*command, *arguments], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    if "ptrace" in result.stderr and result.returncode != -signal.SIGKILL:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == -signal.SIGKILL, result.stderr  # the point was reached


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.parametrize(("syscall", "nth", "committed"), [("pwritev2", 4, False), ("fdatasync", 3, True)])
def test_snapshot_create_survives_sigkill(tmp_path: Path, syscall: str, nth: int, committed: bool) -> None:
    # Order of calls: flush (fdatasync 1), the new structures (pwritev2 1-5), fdatasync 2, the
    # header (pwritev2 6, the commit point), fdatasync 3, ...
    _snapshot_image(tmp_path)
    path = tmp_path / "img.qcow2"
    before = image_state(path)
    _pyhv_killed(tmp_path, syscall, nth, "snapshot", "-c", "new", "img.qcow2")
    check_no_corruption(path)
    state = image_state(path)
    names = [name for name, _ in state[4]]
    assert names == (["old", "new"] if committed else ["old"])
    assert state[:4] == before[:4]


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_create_killed_at_rename_keeps_old_target(tmp_path: Path) -> None:
    _old_target(tmp_path)
    before = image_state(tmp_path / "out.img")
    _pyhv_killed(tmp_path, "/^rename", 1, "create", "-f", "qcow2", "out.img", "2M")
    assert image_state(tmp_path / "out.img") == before
    assert len(_temporaries(tmp_path)) == 1
    create_qcow2(str(tmp_path / "out.img"), Qcow2CreateOptions(size=2 * MIB))
    assert _temporaries(tmp_path) == []
    check_no_corruption(tmp_path / "out.img")
