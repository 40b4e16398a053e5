"""Shared helpers for the qcow2 tests: qemu-img / qemu-io as the oracle, and image builders."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io (Debian qemu-utils) not installed")

KIB = 1 << 10
MIB = 1 << 20


def run(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=check)


def qemu_img(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, cwd=cwd, check=check)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2", cwd: Path | None = None) -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = run(*args, path, cwd=cwd)
    assert "error" not in result.stdout.lower() + result.stderr.lower(), result.stdout + result.stderr


def create(
    path: Path,
    size: int | str,
    *options: str,
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
    fmt: str = "qcow2",
) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def to_raw(path: Path, out: Path, snapshot: str | None = None, read: bool = True) -> bytes:
    args: list[str | Path] = ["convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, path, out)
    return out.read_bytes() if read else b""


def read_all(image) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray(image.size)
    image.readinto(0, [memoryview(buf)])
    return bytes(buf)


def check_clean(path: Path) -> str:
    """qemu-img check output; fails the test on corruption or leaks."""
    result = qemu_img("check", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked" not in result.stdout, result.stdout
    return result.stdout


def check_no_corruption(path: Path) -> subprocess.CompletedProcess:
    """Crash states: leaks (exit 3) are allowed, corruption (exit 2) or failure (1) is not."""
    result = qemu_img("check", "--output=json", path, check=False)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    return result


def random_workload(
    image,
    twin,
    seed: int,
    ops: int,
    max_len: int = 200 * KIB,  # type: ignore[no-untyped-def]
    flush_every: float = 0.1,
    snapshots: bool = False,
) -> None:
    """Random writes, zero writes and discards on `image` and its raw `twin`."""
    rng = random.Random(seed)
    for step in range(ops):
        offset = rng.randrange(0, image.size - 1)
        length = rng.randrange(1, min(max_len, image.size - offset) + 1)
        choice = rng.random()
        if choice < 0.65:
            data = rng.randbytes(length) if rng.random() < 0.3 else bytes([rng.randrange(1, 256)]) * length
            image.write(offset, [data])
            twin.write(offset, [data])
        elif choice < 0.82:
            image.write_zeroes(offset, length)
            twin.write_zeroes(offset, length)
        else:
            image.discard(offset, length)
            after = bytearray(length)  # discard leaves contents unspecified: the twin follows the image
            image.readinto(offset, [memoryview(after)])
            twin.write(offset, [after])
        if rng.random() < flush_every:
            image.flush()
        if snapshots and rng.random() < 0.04:
            image.create_snapshot(f"auto{step}")
