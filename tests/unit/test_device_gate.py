"""One lock per device at the bus, side effects after it (hypervisor/devices/gate.py).

For every device: its effects (console bytes, interrupt lines, stop requests) run with the
device's bus lock released, in the order they were posted, and may re-enter the device; the
device holds no threading lock of its own; every path into it (bus accesses, the console's
feed, state save and restore) runs under the same lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from hypervisor.devices import pc_testdev, pm
from hypervisor.devices.bus import Bus
from hypervisor.devices.cmos import CmosRtc
from hypervisor.devices.debug_exit import DebugExit
from hypervisor.devices.fw_cfg import FwCfg
from hypervisor.devices.gate import DeviceGate, GatedDevice, gate_of
from hypervisor.devices.i8042 import I8042Controller
from hypervisor.devices.pvpanic import PVPANIC_PANICKED, PvPanic
from hypervisor.devices.save_request import SaveRequestPort
from hypervisor.devices.serial import IER, IIR_FCR, LSR, MCR, RBR_THR, Serial16550A

LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition)


def on_bus(device: object, size: int = 8, name: str = "dev") -> DeviceGate:
    bus = Bus("ports", 0x10000)
    bus.insert(device, 0x100, size, name)  # type: ignore[arg-type]
    gate = gate_of(device)
    assert gate is not None and bus.find(0x100).gate is gate  # type: ignore[union-attr]
    return gate


class Probe:
    """An effect target that records whether the device's lock was held when it ran."""

    def __init__(self) -> None:
        self.gate: DeviceGate | None = None
        self.calls: list[tuple[object, ...]] = []
        self.locked_during: list[bool] = []
        self.then: Callable[[], None] | None = None

    def __call__(self, *args: object) -> None:
        assert self.gate is not None
        self.locked_during.append(self.gate.locked())
        self.calls.append(args)
        if self.then is not None:
            self.then()


# ---------------------------------------------------------------- the gate itself


class Counter(GatedDevice):
    def __init__(self, effect: Callable[[int], None]) -> None:
        self.value = 0
        self.effect = effect

    def read(self, offset: int, data: memoryview) -> None:
        data[0] = self._access(lambda: self.value)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, data[0])

    def _write(self, value: int) -> None:
        self.value = value
        self._post(self.effect, value)
        self._post(self.effect, value + 1)


def test_effects_run_in_order_after_the_lock_and_may_re_enter() -> None:
    seen: list[int] = []
    holder: list[Counter] = []

    def effect(value: int) -> None:
        assert not gate.locked()
        seen.append(value)
        if value == 1:
            holder[0].write(0, bytes([5]))  # re-entered from its own effect: no deadlock

    device = Counter(effect)
    holder.append(device)
    gate = on_bus(device, 1)
    device.write(0, bytes([1]))
    # The nested write's effects wait behind the outer ones: one order for everything.
    assert seen == [1, 2, 5, 6] and device.value == 5


def test_an_ungated_device_performs_its_effects_at_the_end_of_each_call() -> None:
    seen: list[int] = []
    device = Counter(seen.append)
    device.write(0, bytes([3]))
    assert seen == [3, 4] and device.gate is None


def test_a_blocked_effect_stalls_neither_the_lock_nor_host_side_calls() -> None:
    release = threading.Event()
    started = threading.Event()
    order: list[str] = []

    def effect(value: int) -> None:
        if value == 1:
            started.set()
            assert release.wait(5)
        order.append(f"effect {value}")

    device = Counter(effect)
    gate = on_bus(device, 1)
    writer = threading.Thread(target=device.write, args=(0, bytes([1])))
    writer.start()
    assert started.wait(5)
    # The lock is free while the first effect blocks: reads go through at once...
    data = bytearray(1)
    device.read(0, memoryview(data))
    assert data[0] == 1 and not gate.locked()
    # ...and a host-side call that posts effects returns without waiting for them.
    device._serialised(device._write, 7)
    assert device.value == 7 and "effect 7" not in order
    # A bus access waits until its own effects are done, by whichever thread performs them.
    waiter = threading.Thread(target=device.write, args=(0, bytes([9])))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    release.set()
    writer.join(5)
    waiter.join(5)
    assert order == ["effect 1", "effect 2", "effect 7", "effect 8", "effect 9", "effect 10"]


def test_an_effect_that_raises_does_not_lose_the_others() -> None:
    seen: list[int] = []

    def effect(value: int) -> None:
        if value == 1:
            raise RuntimeError("console gone")
        seen.append(value)

    device = Counter(effect)
    gate = on_bus(device, 1)
    with pytest.raises(RuntimeError, match="console gone"):
        device.write(0, bytes([1]))
    assert seen == [2] and not gate.locked()
    device.write(0, bytes([3]))  # and the gate works on
    assert seen == [2, 3, 4]


def test_an_interrupted_drain_leaves_the_rest_to_the_next_access() -> None:
    seen: list[int] = []

    def effect(value: int) -> None:
        if value == 1 and not seen:
            seen.append(-1)
            raise KeyboardInterrupt
        seen.append(value)

    device = Counter(effect)
    gate = on_bus(device, 1)
    with pytest.raises(KeyboardInterrupt):
        device.write(0, bytes([1]))
    assert seen == [-1] and not gate.locked()
    device.write(0, bytes([3]))  # the interrupted batch's rest comes first
    assert seen == [-1, 2, 3, 4]


# ---------------------------------------------------------------- the devices


def test_no_device_has_a_lock_of_its_own() -> None:
    devices: list[object] = [
        Serial16550A(), CmosRtc(), I8042Controller(), FwCfg(1 << 20, 1), pm.Pm1Registers(lambda: None),
        pm.PmTimer(), pm.ResetRegister(lambda: None), PvPanic(lambda outcome: None), DebugExit(lambda status: None),
        SaveRequestPort(lambda: None), pc_testdev.ScratchRegister(), pc_testdev.IoMemory(),
        pc_testdev.FlushPage(lambda gpa: None), pc_testdev.IrqLines(lambda line, high: None),
    ]  # fmt: skip
    for device in devices:
        assert isinstance(device, GatedDevice), type(device).__name__
        locks = [name for name, value in vars(device).items() if isinstance(value, LOCK_TYPES)]
        assert locks == [], f"{type(device).__name__} has {locks}"


class RecordingLine:
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def set_level(self, high: bool) -> None:
        self.probe("irq", high)

    def pulse(self) -> None:  # pragma: no cover - the UART drives a level
        raise AssertionError


def test_serial_output_and_interrupt_run_after_the_lock_in_order() -> None:
    probe = Probe()
    uart = Serial16550A(lambda data: probe("out", data), RecordingLine(probe), hold_input_until_driver=False)
    probe.gate = on_bus(uart, name="COM1")
    uart.write(MCR, b"\x08")  # OUT2: the line may be driven
    uart.write(IER, b"\x02")  # THR empty interrupt: raised at once
    uart.read(IIR_FCR, memoryview(bytearray(1)))  # reading IIR clears it: the line drops
    uart.write(RBR_THR, b"A")  # sends 'A' and re-arms the interrupt: the byte goes first
    assert probe.calls == [("irq", True), ("irq", False), ("out", b"A"), ("irq", True)]
    assert probe.locked_during == [False] * 4


def test_serial_output_may_type_into_the_uart_and_a_blocked_output_stalls_no_one() -> None:
    release = threading.Event()
    writing = threading.Event()
    uart: Serial16550A

    def output(data: bytes) -> None:
        uart.feed(data.upper())  # a console that echoes into the guest: re-enters the device
        writing.set()
        assert release.wait(5)  # and then its stdout blocks

    uart = Serial16550A(output, hold_input_until_driver=False)
    gate = on_bus(uart, name="COM1")
    vcpu = threading.Thread(target=uart.write, args=(RBR_THR, b"q"))
    vcpu.start()
    assert writing.wait(5)
    # The console thread's input and another vCPU's register reads go on meanwhile.
    assert uart.feed(b"x") == 1
    data = bytearray(1)
    uart.read(LSR, memoryview(data))
    assert data[0] & 0x01 and not gate.locked()
    uart.read(RBR_THR, memoryview(data))
    assert data[0] == ord("Q")
    release.set()
    vcpu.join(5)
    assert not vcpu.is_alive()


def test_serial_state_is_taken_and_set_under_the_bus_lock() -> None:
    uart = Serial16550A()
    gate = on_bus(uart, name="COM1")
    seen: list[bool] = []
    original = uart._encoded_fields

    def encoded() -> dict[str, object]:
        seen.append(gate.locked())
        return original()

    uart._encoded_fields = encoded  # type: ignore[method-assign]
    state = uart.state()
    uart.restore_state(state)
    assert seen == [True]


def test_the_debugger_view_of_the_uart_goes_through_its_lock() -> None:
    uart = Serial16550A()
    gate = on_bus(uart, name="COM1")
    uart.write(3, b"\x80")  # LCR.DLAB
    gate._lock.acquire()  # a vCPU inside the device: the view waits for it
    try:
        view = threading.Thread(target=lambda: seen.append(uart.divisor_latch_enabled))
        seen: list[bool] = []
        view.start()
        view.join(0.1)
        assert view.is_alive() and seen == []
    finally:
        gate._lock.release()
    view.join(5)
    assert seen == [True]


def test_i8042_ports_share_one_lock_and_reset_runs_after_it() -> None:
    probe = Probe()
    controller = I8042Controller(on_reset=probe)
    bus = Bus("ports", 0x10000)
    bus.insert(controller.data_port, 0x60, 1, "i8042 data")  # type: ignore[arg-type]
    bus.insert(controller.command_port, 0x64, 1, "i8042 command")  # type: ignore[arg-type]
    probe.gate = gate_of(controller)
    assert probe.gate is not None and bus.find(0x60).gate is bus.find(0x64).gate is probe.gate  # type: ignore[union-attr]
    probe.then = lambda: controller.command_port.read(0, memoryview(bytearray(1)))  # re-enters
    assert bus.write(0x64, b"\xfe")
    assert probe.calls == [()] and probe.locked_during == [False] and controller.reset_requests == 1


def test_pm1_power_off_and_reset_register_run_after_the_lock() -> None:
    probe = Probe()
    pm1 = pm.Pm1Registers(probe)
    probe.gate = on_bus(pm1, pm.Pm1Registers.SIZE)
    pm1.write(pm.Pm1Registers.CONTROL_OFFSET, (pm.SLP_EN | pm.S5_SLEEP_TYPE << pm.SLP_TYP_SHIFT).to_bytes(2, "little"))
    reset_probe = Probe()
    reset = pm.ResetRegister(reset_probe)
    reset_probe.gate = on_bus(reset, pm.RESET_WINDOW_SIZE)
    reset.write(pm.RESET_OFFSET, bytes([pm.RESET_VALUE]))
    assert probe.locked_during == [False] and reset_probe.locked_during == [False]


@pytest.mark.parametrize("kind", ["debug-exit", "pvpanic", "save-request"])
def test_stop_requests_run_after_the_lock(kind: str) -> None:
    probe = Probe()
    device: GatedDevice
    if kind == "debug-exit":
        device = DebugExit(probe)
    elif kind == "pvpanic":
        device = PvPanic(probe)
    else:
        device = SaveRequestPort(probe)
    probe.gate = on_bus(device, 1)
    probe.then = lambda: device.read(0, memoryview(bytearray(1)))  # type: ignore[attr-defined]
    device.write(0, bytes([PVPANIC_PANICKED]))  # type: ignore[attr-defined]
    assert len(probe.calls) == 1 and probe.locked_during == [False]


def test_pc_testdev_flush_and_irq_lines_run_after_the_lock() -> None:
    probe = Probe()
    flush = pc_testdev.FlushPage(probe)
    probe.gate = on_bus(flush, 4)
    flush.write(0, (0x12345).to_bytes(4, "little"))
    lines = Probe()
    irq = pc_testdev.IrqLines(lines)
    lines.gate = on_bus(irq, pc_testdev.IRQ_LINES)
    irq.write(11, b"\x01\x00")
    assert probe.calls == [(0x12000,)] and lines.calls == [(11, True), (12, False)]
    assert probe.locked_during == [False] and lines.locked_during == [False, False]


def test_one_device_at_two_ranges_has_one_lock() -> None:
    scratch = pc_testdev.ScratchRegister()
    bus = Bus("ports", 0x10000)
    first = bus.insert(scratch, 0xE0, 4, "ioport")  # type: ignore[arg-type]
    second = bus.insert(scratch, 0xE8, 4, "ioport-byte")  # type: ignore[arg-type]
    assert first.gate is second.gate is gate_of(scratch)


def test_devices_without_effects_run_their_accesses_under_the_lock() -> None:
    rtc = CmosRtc(clock=lambda: 0.0)
    gate = on_bus(rtc, 2)
    seen: list[bool] = []
    original = rtc._register

    def register(index: int) -> int:
        seen.append(gate.locked())
        return original(index)

    rtc._register = register  # type: ignore[method-assign]
    rtc.read(1, memoryview(bytearray(1)))
    fw_cfg = FwCfg(1 << 20, 2)
    fw_gate = on_bus(fw_cfg, 2)
    item = fw_cfg.item
    fw_cfg.item = lambda key: (seen.append(fw_gate.locked()), item(key))[1]  # type: ignore[method-assign]
    fw_cfg.read(1, memoryview(bytearray(1)))
    assert seen == [True, True]
