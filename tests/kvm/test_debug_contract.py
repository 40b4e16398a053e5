"""The run loop's debugging contract on real KVM: typed exit events (never on a kick),
acknowledged pause, step_exit, exit breakpoints, start paused, safe teardown, final halts."""

from __future__ import annotations

import threading
import time

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.machine import Machine
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.events import MmioAccess, PortIo
from tests.guests.build import GUEST_BASE, MODE_OUT_FOREVER, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

MMIO_BASE = 0xD000_0000
COM1 = 0x3F8
DEBUG_EXIT = 0x501
COUNTING_PORT = 0x520
PARAM_EXIT_CODE = GUEST_BASE + 2  # tests/guests/common.S
GREETING = b"hello from long mode\n"


class Counter:
    """A port device that counts writes (thread-safe enough: one vCPU writes at a time here)."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


class Window:
    """An MMIO device answering 0x1122334455667788 at +8 and recording writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        value = (0x1122334455667788 if offset == 8 else 0).to_bytes(8, "little")
        data[:] = value[: len(data)]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def make(guest_binary, name: str = "long_mode", cpus: int = 1, **parameters: int) -> tuple[Machine, MemoryConsole]:
    console = MemoryConsole()
    machine = Machine(16, cpus=cpus, console=console, exit_history=64)
    machine.load_raw_bytes(with_parameters(guest_binary(name).read_bytes(), **parameters), GUEST_BASE, name)
    return machine, console


def test_events_are_real_exits_never_kicks(guest_binary) -> None:
    machine, _ = make(guest_binary, "user_mode", mode=MODE_OUT_FOREVER, port=COUNTING_PORT)
    counter = Counter()
    machine.add_port_device(counter, COUNTING_PORT, 1, "counter")
    events = []
    machine.add_exit_hook(lambda event, ctx: events.append(event))
    with machine:
        machine.start()
        for _ in range(20):  # kicks while it runs: each must not look like an exit
            machine.vcpus[0].kick()
            time.sleep(0.005)
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
        result = machine.wait(10)
    assert result.statistics["kicks"] >= 1  # kicks that land between two runs coalesce
    assert len(events) == result.statistics["python_exits"]
    assert all(isinstance(event, PortIo) for event in events)
    writes = [event for event in events if event.port == COUNTING_PORT]
    assert writes and all(event.is_write and event.device == "counter" and event.size == 1 for event in writes)
    # Reads carry the data the device returned (the UART's LSR while printing the greeting).
    lsr_reads = [event for event in events if event.port == COM1 + 5]
    assert lsr_reads and all(not event.is_write and event.data[0] & 0x20 for event in lsr_reads)


def test_pause_waits_until_every_vcpu_is_parked(guest_binary) -> None:
    """Two vCPUs hammer a Python device; after pause(wait=True) nothing moves until resume()."""
    machine, console = make(guest_binary, "user_mode", cpus=2, mode=MODE_OUT_FOREVER, port=COUNTING_PORT)
    counter = Counter()
    machine.add_port_device(counter, COUNTING_PORT, 1, "counter")
    boot_vcpu, second = machine.vcpus
    with machine:
        machine.start()
        assert console.wait_for(b"hello", 30)
        # The second vCPU (an AP waiting for INIT/SIPI in KVM_RUN) joins the boot vCPU's loop.
        assert machine.pause(wait=True, timeout=5)
        second.set_sregs(boot_vcpu.get_sregs())
        second.set_regs(**boot_vcpu.get_regs())
        second.set_mp_state(0)  # KVM_MP_STATE_RUNNABLE
        machine.resume()
        for _ in range(5):
            assert machine.pause(wait=True, timeout=5)
            before = counter.writes
            regs = [vcpu.get_regs() for vcpu in machine.vcpus]
            time.sleep(0.05)
            assert counter.writes == before
            assert [vcpu.get_regs() for vcpu in machine.vcpus] == regs
            machine.resume()
            time.sleep(0.02)
        assert counter.writes > 0
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
        result = machine.wait(10)
    assert result.outcome.kind is OutcomeKind.INTERRUPTED
    assert all(stats["python_exits"] > 100 for stats in result.per_vcpu)  # both vCPUs really ran


def test_start_paused_and_step_exit(guest_binary) -> None:
    machine, console = make(guest_binary, exit_code=9)
    with machine:
        machine.start(paused=True)
        assert machine.pause(wait=True, timeout=5)  # already parked before the first instruction
        assert console.data() == b"" and machine.vcpus[0].read_stats().total_exits == 0
        steps = [machine.step_exit(0, timeout=10) for _ in range(6)]
        assert all(isinstance(step, PortIo) for step in steps)
        # The greeting's first byte is written after polling LSR: the steps see both, in order.
        assert [step.port for step in steps if step.is_write][:1] == [COM1]
        assert console.data() == GREETING[: sum(1 for step in steps if step.port == COM1 and step.is_write)]
        machine.resume()
        result = machine.wait(30)
    assert result.exit_status == 9 and console.data() == GREETING


def test_break_on_the_third_serial_write_then_change_memory_and_registers(guest_binary) -> None:
    machine, console = make(guest_binary, exit_code=1)
    window = Window()
    machine.add_mmio_device(window, MMIO_BASE, 0x1000, "window")
    third = machine.break_on("io", port=COM1, is_write=True, count=3)
    with machine:
        machine.start()
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.reason == "breakpoint" and stop.breakpoint is third
        assert stop.event.data == GREETING[2:3] and third.hits == 3
        assert console.data() == GREETING[:3]
        # Change what the guest will report: its exit code lives in its parameter block.
        machine.memory.write(PARAM_EXIT_CODE, bytes([42]))
        machine.delete_breakpoint(third.id)
        # At the MMIO store, point RBX elsewhere: the following read and write follow it.
        store = machine.break_on("mmio", address=(MMIO_BASE, MMIO_BASE + 0xFFF), is_write=True, count=1)
        machine.resume()
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is store and isinstance(stop.event, MmioAccess)
        regs = machine.vcpus[0].get_regs()
        assert regs["rbx"] == MMIO_BASE
        machine.vcpus[0].set_regs(rbx=MMIO_BASE + 0x100)
        machine.delete_breakpoint(store.id)
        machine.resume()
        result = machine.wait(30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT and result.exit_status == 42
    assert window.writes == [(0, (0x12345678).to_bytes(4, "little")), (0x110, bytes(8))]


def test_a_breakpoint_action_changes_what_a_read_returns(guest_binary) -> None:
    machine, _ = make(guest_binary)
    window = Window()
    machine.add_mmio_device(window, MMIO_BASE, 0x1000, "window")

    def replace(event, ctx) -> bool:
        ctx.set_read_data((0xCAFE).to_bytes(8, "little"))
        assert ctx.regs()["rbx"] == MMIO_BASE and ctx.device is window
        return False  # change the data, do not stop

    read = machine.break_on("mmio", address=MMIO_BASE + 8, is_write=False, action=replace)
    with machine:
        result = machine.run(30)
    assert result.exit_status == 0 and read.hits == 1
    assert window.writes[-1] == (16, (0xCAFE).to_bytes(8, "little"))
    history = list(machine.exit_history)
    assert history[-1].port == DEBUG_EXIT and any(isinstance(event, MmioAccess) for event in history)


def test_close_during_a_run_never_crashes(guest_binary) -> None:
    for _ in range(5):
        machine, _ = make(guest_binary, "user_mode", mode=MODE_OUT_FOREVER, port=COUNTING_PORT)
        machine.add_port_device(Counter(), COUNTING_PORT, 1, "counter")
        machine.start()
        time.sleep(0.02)
        closer = threading.Thread(target=machine.close)
        closer.start()
        closer.join(15)
        assert not closer.is_alive()
        assert machine.control.finished.is_set()
        assert all(not thread.is_alive() for thread in machine._threads)


def test_close_while_paused(guest_binary) -> None:
    machine, _ = make(guest_binary)
    machine.start(paused=True)
    machine.close()
    assert machine.control.outcome is not None and machine.control.outcome.kind is OutcomeKind.INTERRUPTED


def test_a_guest_halted_with_interrupts_off_ends_the_run() -> None:
    with Machine(16, console=MemoryConsole()) as machine:
        machine.load_raw_bytes(bytes([0xFA, 0xF4]), 0x1000)  # cli; hlt
        result = machine.run(30)
    assert result.outcome.kind is OutcomeKind.HALTED and result.exit_status == 119
    assert "interrupts disabled" in result.outcome.detail


def test_a_halt_with_interrupts_on_is_not_final() -> None:
    with Machine(16, console=MemoryConsole()) as machine:
        machine.load_raw_bytes(bytes([0xFB, 0xF4, 0xEB, 0xFD]), 0x1000)  # sti; hlt; jmp back
        result = machine.run(2.5)
    assert result.outcome.kind is OutcomeKind.TIMEOUT


def test_a_breakpoint_added_while_com1_is_served_in_c_sees_every_write_after_it(guest_binary) -> None:
    """A plain run serves COM1's THR writes in C; adding a breakpoint turns that off before the
    breakpoint is live, so not one write after it is taken by C (hypervisor/kvm/uart.py)."""
    console = MemoryConsole()
    machine = Machine(16, console=console)
    machine.load_raw_bytes(with_parameters(guest_binary("long_mode").read_bytes(), mode=MODE_OUT_FOREVER, port=COM1),
                           GUEST_BASE, "long_mode")  # fmt: skip
    with machine:
        machine.start()
        buffer = machine.uart_buffer
        assert buffer is not None
        deadline = time.monotonic() + 30
        while buffer.bytes_taken < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buffer.bytes_taken >= 1000, "the C path took no THR write"
        fifth = machine.break_on("io", port=COM1, is_write=True, count=5)
        taken = buffer.bytes_taken
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is fifth and fifth.hits == 5
        assert buffer.bytes_taken == taken
        machine.delete_breakpoint(fifth.id)  # and with no observer left, C serves COM1 again
        machine.resume()
        deadline = time.monotonic() + 30
        while buffer.bytes_taken == taken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buffer.bytes_taken > taken
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test done"))
        machine.wait(30)
