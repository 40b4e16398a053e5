"""The test guests on real KVM: serial, MMIO, debug-exit, kick, timeout, statistics."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.machine import Machine
from hypervisor.outcome import Outcome, OutcomeKind
from tests.guests.build import (
    GUEST_BASE,
    MODE_MMIO_COUNT,
    MODE_OUT_COUNT,
    MODE_SPIN,
    with_parameters,
)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

MMIO_BASE = 0xD000_0000
GREETINGS = {
    "real_mode": b"hello from real mode\n",
    "long_mode": b"hello from long mode\n",
    "user_mode": b"hello from user mode\n",
}


class MmioDevice:
    """Answers reads at +8 with a known u64 and records every write."""

    VALUE = 0x0123_4567_89AB_CDEF

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        value = self.VALUE.to_bytes(8, "little") if offset == 8 else bytes(8)
        data[:] = value[: len(data)]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def boot(guest_binary, name: str, serial_fast_path: bool = True, **parameters: int) -> tuple[Machine, MemoryConsole]:
    console = MemoryConsole()
    machine = Machine(16, console=console, serial_fast_path=serial_fast_path)
    image = with_parameters(guest_binary(name).read_bytes(), **parameters)
    machine.load_raw_bytes(image, GUEST_BASE, name)
    return machine, console


@pytest.mark.parametrize("name", sorted(GREETINGS))
def test_serial_output_arrives(guest_binary, name: str) -> None:
    machine, console = boot(guest_binary, name)
    with machine:
        result = machine.run(timeout=30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT
    assert console.data() == GREETINGS[name]


def test_output_watchers_see_the_stream_and_a_broken_one_is_dropped(guest_binary) -> None:
    """Machine.output_watchers, the one output-watcher API: every chunk, before the console gets it;
    a watcher that raises is logged and removed, and the guest and the other watchers go on."""
    machine, console = boot(guest_binary, "real_mode")
    seen: list[tuple[int, bytes]] = []  # (bytes the console had when the watcher ran, the chunk)
    calls: list[bytes] = []

    def broken(data: bytes) -> None:
        calls.append(data)
        raise BrokenPipeError("stderr went away")

    def recording(data: bytes) -> None:
        seen.append((len(console.data()), data))

    with machine:
        machine.output_watchers.extend([broken, recording])
        result = machine.run(timeout=30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT
    chunks = [chunk for _, chunk in seen]
    assert b"".join(chunks) == console.data() == GREETINGS["real_mode"]
    assert [had for had, _ in seen] == [sum(map(len, chunks[:index])) for index in range(len(chunks))]
    assert len(calls) == 1 and machine.output_watchers == [recording]


@pytest.mark.parametrize("name", ["long_mode", "user_mode"])
def test_mmio_reaches_the_device_and_returns_its_data(guest_binary, name: str) -> None:
    machine, _ = boot(guest_binary, name)
    device = MmioDevice()
    with machine:
        machine.add_mmio_device(device, MMIO_BASE, 0x1000, "test device")
        result = machine.run(timeout=30)
    assert result.exit_status == 0
    assert device.writes[0] == (0, (0x12345678).to_bytes(4, "little"))
    # The guest read +8 and wrote what it got to +16: the device's value made the round trip.
    assert device.writes[1] == (16, MmioDevice.VALUE.to_bytes(8, "little"))
    assert result.statistics["exits_by_reason"]["MMIO"] == 3


@pytest.mark.parametrize("code", [0, 1, 42, 255])
@pytest.mark.parametrize("name", ["real_mode", "user_mode"])
def test_debug_exit_code_is_the_result(guest_binary, name: str, code: int) -> None:
    machine, _ = boot(guest_binary, name, exit_code=code)
    with machine:
        result = machine.run(timeout=30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT
    assert result.outcome.code == code and result.exit_status == code


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_debug_exit_code_is_the_process_exit_status(guest_binary, tmp_path, code: int) -> None:
    path = tmp_path / "guest.bin"
    path.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=code))
    result = subprocess.run(
        [sys.executable, "-m", "hypervisor", "run", "--raw", f"{path}@0x1000", "--console", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert f"debug-exit {code} (exit status {code})" in result.stderr


def test_qemu_compatible_debug_exit(guest_binary) -> None:
    console = MemoryConsole()
    with Machine(16, console=console, debug_exit_qemu=True) as machine:
        image = with_parameters(guest_binary("real_mode").read_bytes(), exit_code=21)
        machine.load_raw_bytes(image, GUEST_BASE)
        result = machine.run(timeout=30)
    assert result.exit_status == (21 << 1) | 1


def test_kick_stops_a_spinning_guest_quickly(guest_binary) -> None:
    machine, _ = boot(guest_binary, "user_mode", mode=MODE_SPIN)
    with machine:
        machine.start()
        time.sleep(0.3)  # let it reach its loop
        assert not machine.control.finished.is_set()
        kicked_at = time.monotonic()
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test kick"))
        machine._threads[0].join(5)
        stopped_after = time.monotonic() - kicked_at
        result = machine.wait()
    assert result.outcome.kind is OutcomeKind.INTERRUPTED
    assert stopped_after < 0.1, f"the vCPU took {stopped_after * 1000:.1f} ms to stop"
    assert result.statistics["kicks"] >= 1


def test_timeout_ends_a_guest_that_spins_forever(guest_binary) -> None:
    machine, _ = boot(guest_binary, "real_mode", mode=MODE_SPIN)
    with machine:
        result = machine.run(timeout=0.5)
    assert result.outcome.kind is OutcomeKind.TIMEOUT and result.exit_status == 124


def test_statistics_count_the_exits(guest_binary) -> None:
    # 1000 writes to the POST-code port, which the C loop sinks without Python.
    machine, _ = boot(guest_binary, "user_mode", mode=MODE_OUT_COUNT, port=0x80, count=1000)
    with machine:
        result = machine.run(timeout=30)
    stats = result.statistics
    assert result.exit_status == 0
    assert stats["pio_sink"] == 1000
    # puts64 polls LSR before each byte and before finding the NUL, writes THR per byte; +1 exit.
    greeting_exits = 2 * len(GREETINGS["user_mode"]) + 1 + 1
    assert stats["exits_by_reason"]["IO"] == 1000 + greeting_exits
    # COM1's LSR polls and THR writes are served in C too (the UART's transmit fast path): only
    # the newline's flush and the debug-exit write reach Python.
    length = len(GREETINGS["user_mode"])
    assert stats["uart_thr_writes_in_c"] == length and stats["uart_lsr_reads_in_c"] == length + 1
    assert stats["python_exits"] == 2


def test_without_the_serial_fast_path_every_console_access_reaches_python(guest_binary) -> None:
    machine, console = boot(guest_binary, "user_mode", mode=MODE_OUT_COUNT, port=0x80, count=10,
                            serial_fast_path=False)  # fmt: skip
    with machine:
        result = machine.run(timeout=30)
    stats = result.statistics
    assert stats["uart_thr_writes_in_c"] == 0
    assert stats["python_exits"] == 2 * len(GREETINGS["user_mode"]) + 1 + 1
    assert console.data() == GREETINGS["user_mode"]


def test_unmapped_port_and_mmio_accesses_are_answered_and_counted(guest_binary, caplog) -> None:
    machine, _ = boot(guest_binary, "user_mode", mode=MODE_OUT_COUNT, port=0x1234, count=10)
    with machine:
        result = machine.run(timeout=30)
    assert result.exit_status == 0
    assert result.statistics["pio_unmapped_writes"] == 10
    assert result.statistics["first_unmapped_port"] == 0x1234
    assert "ports with no device (first at 0x1234)" in caplog.text

    machine, _ = boot(guest_binary, "user_mode", mode=MODE_MMIO_COUNT, count=5)
    with machine:
        result = machine.run(timeout=30)
    assert result.exit_status == 0 and result.statistics["mmio_unmapped_writes"] == 5


def test_a_device_that_raises_does_not_kill_the_vcpu(guest_binary) -> None:
    class Broken:
        def read(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("device bug")

        def write(self, offset: int, data: bytes) -> None:
            raise RuntimeError("device bug")

    machine, _ = boot(guest_binary, "long_mode")
    with machine:
        machine.add_mmio_device(Broken(), MMIO_BASE, 0x1000)
        result = machine.run(timeout=30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT and result.exit_status == 0
    assert machine.runners[0].device_errors == 3


def test_pause_and_resume(guest_binary) -> None:
    machine, console = boot(guest_binary, "user_mode", mode=MODE_SPIN)
    with machine:
        machine.start()
        assert console.wait_for(b"hello", 10)
        machine.control.pause()
        time.sleep(0.1)
        assert machine.control.paused and not machine.control.finished.is_set()
        machine.control.resume()
        timer = threading.Timer(0.2, machine.request_stop, args=(Outcome(OutcomeKind.INTERRUPTED),))
        timer.start()
        result = machine.wait(10)
    assert result.outcome.kind is OutcomeKind.INTERRUPTED


def test_multiboot_kernel_through_the_cli() -> None:
    from tests.guests.build import ToolMissing, build_multiboot_guest

    try:
        kernel = build_multiboot_guest("multiboot")
    except ToolMissing as error:
        pytest.skip(str(error))
    command = [sys.executable, "-m", "hypervisor", "run", "--kernel", str(kernel), "--append", "alpha beta"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hello from multiboot\n" in result.stdout
    # The kernel's file name comes first, as GRUB and QEMU pass it (kvm-unit-tests read argv[0]).
    assert f"cmdline: {kernel.name} alpha beta\n" in result.stdout


def test_exit_trace_shows_what_the_guest_asked(guest_binary, tmp_path) -> None:
    trace = tmp_path / "trace.txt"
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=5))
    command = [sys.executable, "-m", "hypervisor", "run", "--raw", f"{image}@0x1000", "--console", "none",
               "--trace-exits", str(trace)]  # fmt: skip
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 5
    lines = trace.read_text().splitlines()
    writes = [line for line in lines if "pio-out port=0x3f8" in line]
    assert bytes.fromhex("".join(line.rsplit("data=", 1)[1] for line in writes)) == GREETINGS["real_mode"]
    # The debug-exit write is the last exit: the kick that ended the run is not an exit.
    assert lines[-1].endswith("vcpu0 pio-out port=0x501 size=1 data=05")
    assert not any("kick" in line for line in lines)
