"""Post-mortems of crashing test guests through `pyhv run`: stderr, --report and --post-mortem DIR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.kvm import kvm_is_pvm
from tests.guests.build import MODE_SPIN, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

PYHV = [sys.executable, "-m", "hypervisor"]
# Real mode at 0x1000: an empty IDT (limit 0), protected mode on, then ud2. The #UD cannot be
# delivered (its gate is past the IDT limit: #GP), nor can the #GP or the #DF that follow: a
# triple fault (SDM Vol. 3 §6.15, interrupt 8). Bytes:
#   0f 01 1e 20 10   lidt [0x1020]      0f 20 c0   mov eax, cr0      0c 01   or al, 1
#   0f 22 c0         mov cr0, eax       0f 0b      ud2               f4      hlt
# with the IDT descriptor (limit 0, base 0) at 0x1020.
TRIPLE_FAULT_CODE = bytes.fromhex("0f011e2010 0f20c0 0c01 0f22c0 0f0b f4")
TRIPLE_FAULT_GUEST = TRIPLE_FAULT_CODE + bytes(0x20 - len(TRIPLE_FAULT_CODE)) + bytes(6)
UD2_ADDRESS = 0x1000 + TRIPLE_FAULT_CODE.index(bytes.fromhex("0f0b"))
# xsave [bx] in real mode: KVM's emulator on kvm_pvm cannot run it, nor does pyhv's (PLATFORM.md).
XSAVE_GUEST = bytes.fromhex("0fae27 f4")


def run(tmp_path: Path, image: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "guest.bin"
    path.write_bytes(image)
    command = [*PYHV, "run", "--raw", f"{path}@0x1000", "--console", "none", "--timeout", "30", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def test_triple_fault_post_mortem_on_stderr_and_in_files(tmp_path: Path) -> None:
    directory = tmp_path / "pm"
    result = run(tmp_path, TRIPLE_FAULT_GUEST, "--post-mortem", str(directory))
    assert result.returncode == 120, result.stderr
    assert "pyhv: post-mortem (triple-fault" in result.stderr
    assert "vcpu0 (protected mode, CPL 0)" in result.stderr
    assert f"rip={UD2_ADDRESS:016x}" in result.stderr
    assert "code at rip: 0f 0b f4" in result.stderr
    report = json.loads((directory / "report.json").read_text())
    assert report["outcome"] == "triple-fault"
    vcpu = report["post_mortem"]["vcpus"][0]
    assert vcpu["regs"]["rip"] == UD2_ADDRESS and vcpu["sregs"]["cr0"] & 1 and vcpu["code"].startswith("0f 0b")
    exits = [json.loads(line) for line in (directory / "exits.jsonl").read_text().splitlines()]
    assert exits[-1]["kind"] == "shutdown"
    assert "cr0=0000000000000011" in (directory / "regs.txt").read_text()
    assert (directory / "console.txt").read_bytes() == b""
    try:
        import capstone  # noqa: F401
    except ImportError:
        return
    assert f"{UD2_ADDRESS:#x}: ud2" in result.stderr and vcpu["disassembly"][0] == f"{UD2_ADDRESS:#x}: ud2"


def test_symbols_name_rip(tmp_path: Path) -> None:
    system_map = tmp_path / "System.map"
    system_map.write_text("0000000000001000 T _start\n0000000000001020 D idt_descriptor\n")
    result = run(tmp_path, TRIPLE_FAULT_GUEST, "--kernel-symbols", str(system_map))
    assert result.returncode == 120
    assert f"code at rip <_start+{UD2_ADDRESS - 0x1000:#x}/0x20>: 0f 0b" in result.stderr
    assert "last exits: not kept" in result.stderr  # neither --post-mortem nor --report


def test_report_gets_the_post_mortem(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run(tmp_path, TRIPLE_FAULT_GUEST, "--report", str(report_path))
    assert result.returncode == 120
    post_mortem = json.loads(report_path.read_text())["post_mortem"]
    assert post_mortem["outcome"] == "triple-fault" and post_mortem["last_exits"][-1]["kind"] == "shutdown"


def test_emulation_failure_post_mortem(tmp_path: Path) -> None:
    if not kvm_is_pvm():
        pytest.skip("xsave runs on hardware virtualization; only kvm_pvm's emulator fails on it")
    result = run(tmp_path, XSAVE_GUEST, "--post-mortem", str(tmp_path / "pm"))
    assert result.returncode == 122, result.stderr
    assert "code at rip: 0f ae 27 f4" in result.stderr
    exits = [json.loads(line) for line in (tmp_path / "pm" / "exits.jsonl").read_text().splitlines()]
    assert exits[-1]["kind"] == "emulation-failure" and exits[-1]["instruction"].startswith("0fae27")


def test_timeout_post_mortem_has_the_console_tail(guest_binary, tmp_path: Path) -> None:
    image = with_parameters(guest_binary("user_mode").read_bytes(), mode=MODE_SPIN)
    path = tmp_path / "spin.bin"
    path.write_bytes(image)
    command = [*PYHV, "run", "--raw", f"{path}@0x1000", "--console", "none", "--timeout", "2",
               "--post-mortem", str(tmp_path / "pm")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 124, result.stderr
    assert "vcpu0 (long mode, CPL 3)" in result.stderr
    assert "| hello from user mode" in result.stderr
    assert (tmp_path / "pm" / "console.txt").read_bytes() == b"hello from user mode\n"
    exits = [json.loads(line) for line in (tmp_path / "pm" / "exits.jsonl").read_text().splitlines()]
    assert exits[-1]["meaning"] == "serial LSR -> 0x60"  # puts64 polls THRE once more before its NUL
    # The history keeps events, not devices: without the UART to ask for DLAB, both names.
    assert [e for e in exits if e.get("register") == "THR/DLL"][-1]["meaning"] == "serial THR/DLL 0x0a ('\\n')"


def test_a_clean_exit_writes_no_post_mortem(guest_binary, tmp_path: Path) -> None:
    result = run(tmp_path, guest_binary("real_mode").read_bytes(), "--post-mortem", str(tmp_path / "pm"))
    assert result.returncode == 0 and "post-mortem" not in result.stderr
    assert list((tmp_path / "pm").iterdir()) == []


@pytest.mark.parametrize(
    ("option", "make", "message"),
    [
        ("--post-mortem", lambda p: (p / "file").write_text("x") and p / "file", "exists and is not a directory"),
        ("--post-mortem", lambda p: p / "absent" / "pm", "does not exist"),
        ("--kernel-symbols", lambda p: p / "absent.map", "does not exist"),
        ("--kernel-symbols", lambda p: (p / "bad.map").write_text("nonsense\n") and p / "bad.map", "not a System.map"),
    ],
)
def test_bad_paths_are_one_line_before_the_run(tmp_path: Path, option: str, make, message: str) -> None:
    result = run(tmp_path, TRIPLE_FAULT_GUEST, option, str(make(tmp_path)))
    assert result.returncode == 3, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "triple-fault" not in result.stderr
