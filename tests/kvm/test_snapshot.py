"""Snapshots on real KVM: a guest saved mid-run continues exactly after restore, twice at once,
from the CLI too; damaged, foreign or wrong-version snapshots are refused and left untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.errors import ConfigError
from hypervisor.machine import Machine
from tests.guests.build import GUEST_BASE, MODE_OUT_COUNT, with_parameters

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

COUNTING_PORT = 0x520
WRITES = 200
SAVE_AT = 50


class Counter:
    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


def counting_machine(guest_binary) -> tuple[Machine, Counter, MemoryConsole]:
    console = MemoryConsole()
    machine = Machine(16, console=console)
    counter = Counter()
    machine.add_port_device(counter, COUNTING_PORT, 1, "counter")
    image = with_parameters(guest_binary("user_mode").read_bytes(), exit_code=3, mode=MODE_OUT_COUNT,
                            port=COUNTING_PORT, count=WRITES)  # fmt: skip
    machine.load_raw_bytes(image, GUEST_BASE)
    return machine, counter, console


def restored(snapshot: Path) -> tuple[Machine, Counter, MemoryConsole]:
    console = MemoryConsole()
    machine = Machine.restore(str(snapshot), console)
    counter = Counter()
    machine.add_port_device(counter, COUNTING_PORT, 1, "counter")
    return machine, counter, console


@pytest.fixture
def snapshot(guest_binary, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A user_mode guest saved after its 50th write of 200, with its registers at that point."""
    machine, counter, console = counting_machine(guest_binary)
    target = tmp_path / "snap"
    with machine:
        stop_at = machine.break_on("io", port=COUNTING_PORT, is_write=True, count=SAVE_AT)
        machine.start()
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is stop_at
        machine.delete_breakpoint(stop_at.id)
        registers = machine.vcpus[0].get_regs()
        machine.save(str(target))
        assert machine.paused  # saving keeps a paused machine paused
        machine.resume()
        result = machine.wait(30)
    assert result.exit_status == 3 and counter.writes == WRITES
    assert console.data() == b"hello from user mode\n"
    return target, registers


def test_a_restored_guest_continues_exactly(snapshot) -> None:
    folder, registers = snapshot
    memory_hash = hashlib.sha256((folder / "memory.raw").read_bytes()).hexdigest()
    machine, counter, console = restored(folder)
    with machine:
        assert machine.vcpus[0].get_regs() == registers
        result = machine.run(30)
    # The rest of the loop, not one write more or less; the greeting is not printed again.
    assert result.exit_status == 3 and counter.writes == WRITES - SAVE_AT
    assert console.data() == b""
    assert hashlib.sha256((folder / "memory.raw").read_bytes()).hexdigest() == memory_hash
    assert (folder / "memory.raw").stat().st_blocks * 512 < (folder / "memory.raw").stat().st_size  # sparse


def test_two_restores_of_one_snapshot_at_once(snapshot) -> None:
    folder, _ = snapshot
    results: list[tuple[int, int]] = []

    def run_one() -> None:
        machine, counter, _ = restored(folder)
        with machine:
            results.append((machine.run(30).exit_status, counter.writes))

    threads = [threading.Thread(target=run_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [(3, WRITES - SAVE_AT)] * 2


def _files(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage", ["truncate-memory", "flip-state", "flip-memory", "fill-hole", "version", "vendor",
                                    "no-header", "garbage-header"])  # fmt: skip
def test_damaged_snapshots_are_refused_and_untouched(snapshot, damage: str) -> None:
    folder, _ = snapshot
    header_path = folder / "header.json"
    header = json.loads(header_path.read_text())
    if damage == "truncate-memory":
        with open(folder / "memory.raw", "r+b") as memory:
            memory.truncate(4096)
    elif damage in ("flip-state", "flip-memory"):
        path = folder / ("state.json" if damage == "flip-state" else "memory.raw")
        data = bytearray(path.read_bytes())
        where = len(data) // 2 if damage == "flip-state" else 0x1000 + 40  # inside the guest's code
        data[where] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "fill-hole":  # a byte written where the saved RAM had a hole (a zero chunk)
        with open(folder / "memory.raw", "r+b") as memory:
            memory.seek(12 << 20)
            memory.write(b"\x01")
    elif damage == "version":
        header["version"] = 99
        header_path.write_text(json.dumps(header))
    elif damage == "vendor":
        header["host"]["cpu_vendor"] = "SomeOtherCPU"
        header_path.write_text(json.dumps(header))
    elif damage == "no-header":
        header_path.unlink()
    else:
        header_path.write_bytes(b"\x00\xffnot json")
    before = _files(folder)
    with pytest.raises(ConfigError) as error:
        Machine.restore(str(folder), MemoryConsole())
    assert "\n" not in str(error.value) and str(folder) in str(error.value)
    assert _files(folder) == before


def test_save_and_restore_from_the_cli(guest_binary, tmp_path: Path) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=6))
    folder = tmp_path / "saved"
    run = [sys.executable, "-m", "hypervisor", "run", "--timeout", "60"]
    first = subprocess.run([*run, "--raw", f"{image}@0x1000", "--save", str(folder), "--save-on", "hello"],
                           capture_output=True, text=True, timeout=100, cwd=ROOT)  # fmt: skip
    assert first.returncode == 6, first.stderr
    assert f"saved the machine to {folder}" in first.stderr
    second = subprocess.run([*run, "--restore", str(folder)], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert second.returncode == 6, second.stderr
    # The save happened when "hello" had been printed: the restored run prints the rest.
    assert first.stdout.startswith("hello") and second.stdout and "hello" not in second.stdout
    assert first.stdout.endswith(second.stdout)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--save-on", "x"], "--save-on needs --save"),
        (["--save", "{tmp}/s"], "needs a trigger"),
        (["--save", "{tmp}/missing/s", "--save-on", "x"], "does not exist"),
        (["--restore", "{tmp}"], "no header.json"),
        (["--restore", "{tmp}/nothing"], "is not a folder"),
    ],
)
def test_bad_snapshot_options(guest_binary, tmp_path: Path, arguments: list[str], message: str) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(guest_binary("real_mode").read_bytes())
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    raw = [] if "--restore" in arguments else ["--raw", f"{image}@0x1000"]
    result = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", *raw, *arguments],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and message in lines[0], result.stderr


def test_the_guest_asks_for_its_own_save(guest_binary, tmp_path: Path) -> None:
    """`--save-on-request`: the guest's write to port 0x50a saves it just after that OUT."""
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("user_mode").read_bytes(), exit_code=4, mode=MODE_OUT_COUNT,
                                      port=0x50A, count=1))  # fmt: skip
    folder = tmp_path / "asked"
    run = [sys.executable, "-m", "hypervisor", "run", "--timeout", "60", "--console", "none"]
    first = subprocess.run([*run, "--raw", f"{image}@0x1000", "--save", str(folder), "--save-on-request"],
                           capture_output=True, text=True, timeout=100, cwd=ROOT)  # fmt: skip
    assert first.returncode == 4 and f"saved the machine to {folder}" in first.stderr, first.stderr
    second = subprocess.run([*run, "--restore", str(folder)], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert second.returncode == 4, second.stderr


def test_save_from_the_exit_debugger(guest_binary, tmp_path: Path) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=8))
    folder = tmp_path / "from-debug"
    script = f"break io port=0x3f8 write count=2\ncontinue\nsave {folder}\ndelete 1\ncontinue\n"
    debug = subprocess.run([sys.executable, "-m", "hypervisor", "debug", "--raw", f"{image}@0x1000", "--console",
                            "none", "--timeout", "60"], input=script, capture_output=True, text=True, timeout=100,
                           cwd=ROOT)  # fmt: skip
    assert debug.returncode == 8 and f"saved the machine to {folder}" in debug.stdout, debug.stdout + debug.stderr
    restored = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--restore", str(folder), "--timeout", "60"],
                              capture_output=True, text=True, timeout=100, cwd=ROOT)  # fmt: skip
    assert restored.returncode == 8 and restored.stdout == "llo from real mode\n", restored.stdout


def test_the_restored_vm_fixture_clones_a_snapshot(snapshot, restored_vm) -> None:
    folder, _ = snapshot
    first, second = restored_vm(folder, timeout=30), restored_vm(folder, timeout=30)
    assert first.exit_status == second.exit_status == 3
    assert first.report["outcome"] == "debug-exit" and first.total_exits > 0


def test_save_then_stop_ends_the_run_at_the_save(guest_binary, tmp_path: Path) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=6))
    folder = tmp_path / "saved"
    run = [sys.executable, "-m", "hypervisor", "run", "--timeout", "60"]
    first = subprocess.run([*run, "--raw", f"{image}@0x1000", "--save", str(folder), "--save-on", "hello",
                            "--save-then", "stop"], capture_output=True, text=True, timeout=100, cwd=ROOT)  # fmt: skip
    assert first.returncode == 0 and "saved: saved to" in first.stderr, first.stderr
    assert first.stdout == "hello"  # nothing after the save point ran
    second = subprocess.run([*run, "--restore", str(folder)], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert second.returncode == 6 and second.stdout == " from real mode\n", second.stderr


def test_the_exit_debugger_on_a_restored_machine(guest_binary, tmp_path: Path) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=5))
    folder = tmp_path / "saved"
    run = [sys.executable, "-m", "hypervisor", "run", "--timeout", "60", "--console", "none"]
    saving = subprocess.run([*run, "--raw", f"{image}@0x1000", "--save", str(folder), "--save-on", "hello",
                             "--save-then", "stop"], capture_output=True, text=True, timeout=100, cwd=ROOT)  # fmt: skip
    assert saving.returncode == 0, saving.stderr
    debug = subprocess.run([sys.executable, "-m", "hypervisor", "debug", "--restore", str(folder), "--console", "none",
                            "--timeout", "60"], input="next\ncontinue\n", capture_output=True, text=True, timeout=100,
                           cwd=ROOT)  # fmt: skip
    # The first exit after the save point is the UART poll before " from real mode"'s first byte.
    assert debug.returncode == 5, debug.stdout + debug.stderr
    assert "port=0x3fd" in debug.stdout and "restored guest paused" in debug.stderr


def test_a_snapshot_needing_a_capability_this_kvm_lacks_is_refused(snapshot, monkeypatch) -> None:
    from hypervisor.kvm import Kvm

    folder, _ = snapshot
    real = Kvm.check_extension
    monkeypatch.setattr(Kvm, "check_extension", lambda kvm, name: 0 if name == "KVM_CAP_XSAVE" else real(kvm, name))
    before = _files(folder)
    with pytest.raises(ConfigError, match="needs what this host's KVM lacks: KVM_CAP_XSAVE"):
        Machine.restore(str(folder), MemoryConsole())
    assert _files(folder) == before
