"""`pyhv run` checks sizes before it reads anything: guest RAM against the host, and the kernel,
initrd or raw file against guest RAM. A 100 GiB sparse file must be refused in one line, at
once, without the process reading it (the run is given an address-space limit far below the
file's size, so a read would fail with MemoryError instead of passing by luck).

All of these are refused before a VM exists, so no /dev/kvm is needed.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.machine import host_memory_bytes

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
ADDRESS_SPACE_LIMIT = 4 * GiB  # the interpreter needs far less; a 100 GiB read would need more


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def pyhv_run(*arguments: str) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--timeout", "10", *arguments]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            preexec_fn=_limit_address_space)  # fmt: skip
    return result, time.monotonic() - start


def assert_refused(result: subprocess.CompletedProcess[str], seconds: float, message: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert seconds < 20, f"took {seconds:.1f} s"


@pytest.fixture
def sparse_100g(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "huge.img"
    try:
        with open(path, "wb") as file:
            file.truncate(100 * GiB)
    except OSError as error:
        pytest.skip(f"cannot make a 100 GiB sparse file in {tmp_path}: {error.strerror}")
    yield path
    assert path.stat().st_blocks == 0, "the sparse file was written to"
    path.unlink()


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.bin"
    path.write_bytes(b"\xf4" * 4096)
    return path


@pytest.mark.parametrize("memory", ["1T", "200G"])
@pytest.mark.parametrize("role", ["--kernel", "--initrd", "--raw"])
def test_more_guest_ram_than_the_host_has(sparse_100g: Path, small_file: Path, memory: str, role: str) -> None:
    if host_memory_bytes() == 0:
        pytest.skip("/proc/meminfo has no MemTotal, so the host's memory is unknown")
    if host_memory_bytes() >= 200 * GiB:
        pytest.skip("this host has 200 GiB of memory or more")
    if role == "--raw":
        arguments = ["--raw", f"{sparse_100g}@0x1000"]
    elif role == "--initrd":
        arguments = ["--kernel", str(small_file), "--initrd", str(sparse_100g)]
    else:
        arguments = ["--kernel", str(sparse_100g)]
    assert_refused(*pyhv_run("--mem", memory, *arguments), "of guest memory is more than this host has")


@pytest.mark.parametrize("role", ["--kernel", "--initrd", "--raw"])
def test_file_larger_than_guest_ram(sparse_100g: Path, small_file: Path, role: str) -> None:
    if role == "--raw":
        arguments = ["--raw", f"{sparse_100g}@0x1000"]
        message = f"raw guest {sparse_100g} (102400 MiB) is larger than the guest's RAM (16 MiB)"
    elif role == "--initrd":
        arguments = ["--kernel", str(small_file), "--initrd", str(sparse_100g)]
        message = f"initrd {sparse_100g} (102400 MiB) is larger than the guest's RAM (256 MiB)"
    else:
        arguments = ["--kernel", str(sparse_100g)]
        message = f"kernel {sparse_100g} (102400 MiB) is larger than the guest's RAM (256 MiB)"
    assert_refused(*pyhv_run(*arguments), message)


def test_kernel_and_initrd_together_larger_than_guest_ram(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    for path in (kernel, initrd):
        with open(path, "wb") as file:
            file.truncate(40 << 20)
    result, seconds = pyhv_run("--mem", "64M", "--kernel", str(kernel), "--initrd", str(initrd))
    assert_refused(result, seconds, "is larger than the guest's RAM left beside the kernel (24 MiB)")
