"""`pyhv run` with bad input: one line on stderr, a documented exit status, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.guest_images import default_guest

ROOT = Path(__file__).resolve().parents[2]


def pyhv_run(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--timeout", "30", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]


@pytest.fixture
def guest(guest_binary) -> str:
    return f"{guest_binary('real_mode')}@0x1000"


# -- refused before any VM exists: no /dev/kvm needed ---------------------------------------


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--raw", "guest.bin"], "--raw wants FILE@ADDRESS"),
        (["--raw", "guest.bin@zero"], "is not a number"),
        (["--raw", "/nonexistent/guest.bin@0x1000"], "does not exist"),
        (["--raw", "/@0x1000"], "is a directory"),
        (["--mem", "0"], "must be a positive whole number of MiB"),
        (["--mem", "lots"], "not a size"),
        (["--mem", "64T"], "more than pyhv allows"),
        (["--console", "serial"], "use stdio, none or file:PATH"),
        (["--debug-exit-port", "0x10000"], "is not a port number"),
        (["--kernel", "/nonexistent/bzImage"], "does not exist"),
        (["--kernel", "/dev/zero"], "is not a regular file"),
        (["--raw", "/dev/zero@0x1000"], "is not a regular file"),
        (["--disk", ",format=raw"], "the path comes first"),
    ],
)
def test_refused_before_the_vm_exists(arguments: list[str], message: str) -> None:
    assert_one_line_error(pyhv_run(*arguments), 3, message)


def test_a_file_that_is_not_a_kernel(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho not a kernel\n")
    assert_one_line_error(pyhv_run("--kernel", str(script)), 3, "is not a kernel pyhv can boot")


def test_a_truncated_bzimage(tmp_path: Path) -> None:
    bundled = ROOT / "guest_images" / "bzImage"
    if not bundled.exists():
        pytest.skip("guest_images/bzImage is not built")
    truncated = tmp_path / "bzImage"
    truncated.write_bytes(bundled.read_bytes()[:20000])
    assert_one_line_error(pyhv_run("--kernel", str(truncated)), 3, "truncated")


def test_usage_errors_are_status_2() -> None:
    result = pyhv_run("--no-such-option")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# -- refused while loading into a VM ----------------------------------------------------------


@pytest.mark.kvm
def test_a_raw_guest_that_does_not_fit(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2 << 20))  # as large as RAM, so it cannot also start at 0x1000
    assert_one_line_error(pyhv_run("--raw", f"{big}@0x1000", "--mem", "2"), 3, "does not fit")


@pytest.mark.kvm
def test_an_initrd_larger_than_guest_ram(tmp_path: Path) -> None:
    try:
        kernel, _ = default_guest()
    except Exception as error:
        pytest.skip(f"the bundled guest is not built: {error}")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(80 << 20))
    assert_one_line_error(pyhv_run("--kernel", str(kernel), "--initrd", str(initrd), "--mem", "64"), 3, "initrd")
    initrd.write_bytes(bytes(60 << 20))  # smaller than RAM, but not beside the kernel below its limit
    assert_one_line_error(pyhv_run("--kernel", str(kernel), "--initrd", str(initrd), "--mem", "64"), 3, "initrd")


@pytest.mark.kvm
def test_a_command_line_beyond_the_kernels_limit() -> None:
    try:
        kernel, _ = default_guest()
    except Exception as error:
        pytest.skip(f"the bundled guest is not built: {error}")
    result = pyhv_run("--kernel", str(kernel), "--append", "x" * 5000)
    assert_one_line_error(result, 3, "command line")


@pytest.mark.kvm
def test_memory_too_small_for_the_kernel() -> None:
    try:
        kernel, _ = default_guest()
    except Exception as error:
        pytest.skip(f"the bundled guest is not built: {error}")
    assert_one_line_error(pyhv_run("--kernel", str(kernel), "--mem", "8"), 3, "more than 8 MiB of guest RAM")


@pytest.mark.kvm
def test_a_guest_writing_to_an_unmapped_port_warns_once(guest_binary, tmp_path: Path) -> None:
    from tests.guests.build import MODE_OUT_COUNT, with_parameters

    image = tmp_path / "guest.bin"
    parameters = {"mode": MODE_OUT_COUNT, "port": 0x2345, "count": 3}
    image.write_bytes(with_parameters(guest_binary("user_mode").read_bytes(), **parameters))
    result = pyhv_run("--raw", f"{image}@0x1000")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "first at 0x2345" in warnings[0]


@pytest.mark.kvm
def test_a_guest_spinning_forever_is_ended_by_the_timeout(guest_binary, tmp_path: Path) -> None:
    from tests.guests.build import MODE_SPIN, with_parameters

    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), mode=MODE_SPIN))
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--timeout", "1"]
    command += ["--raw", f"{image}@0x1000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 124
    assert "timeout" in result.stderr and "Traceback" not in result.stderr
