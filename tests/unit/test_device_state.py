"""Device state as data: every stateful device round-trips through JSON, and a state that is not
its own, of another version or damaged is refused with one line."""

from __future__ import annotations

import json

import pytest

from hypervisor.devices.cmos import CmosRtc
from hypervisor.devices.i8042 import I8042Controller
from hypervisor.devices.serial import Serial16550A
from hypervisor.errors import ConfigError


def busy_serial() -> Serial16550A:
    serial = Serial16550A(hold_input_until_driver=False)
    serial.write(3, bytes([0x83]))  # LCR: DLAB, 8 bits
    serial.write(0, bytes([0x01]))  # DLL
    serial.write(3, bytes([0x03]))
    serial.write(2, bytes([0xC7]))  # FIFOs on, trigger 14
    serial.write(1, bytes([0x01]))  # IER: receive interrupt
    serial.write(4, bytes([0x0B]))  # MCR: DTR RTS OUT2
    serial.feed(b"typed ahead, more than a FIFO holds")
    return serial


def busy_i8042() -> I8042Controller:
    controller = I8042Controller()
    controller.command_port.write(0, bytes([0x20]))  # read the command byte: one byte queued
    return controller


def busy_rtc() -> CmosRtc:
    rtc = CmosRtc(clock=lambda: 0.0)
    rtc.write(0, bytes([0x40]))
    rtc.write(1, bytes([0x5A]))  # CMOS RAM byte 0x40
    return rtc


@pytest.mark.parametrize("make", [busy_serial, busy_i8042, busy_rtc])
def test_round_trip_through_json(make) -> None:
    device = make()
    state = json.loads(json.dumps(device.state()))
    twin = type(device)()
    twin.restore_state(state)
    assert twin.state() == device.state()
    # And the twin behaves as the original from here on: the same reads give the same bytes.
    for offset in range(8) if isinstance(device, Serial16550A) else (1,) if isinstance(device, CmosRtc) else ():
        a, b = bytearray(1), bytearray(1)
        device.read(offset, memoryview(a))
        twin.read(offset, memoryview(b))
        assert a == b, offset
    if isinstance(device, I8042Controller):
        a, b = bytearray(1), bytearray(1)
        device.data_port.read(0, memoryview(a))
        twin.data_port.read(0, memoryview(b))
        assert a == b


def test_serial_input_survives() -> None:
    device = busy_serial()
    twin = Serial16550A(hold_input_until_driver=False)
    twin.restore_state(device.state())
    received = bytearray()
    for _ in range(len(b"typed ahead, more than a FIFO holds")):
        byte = bytearray(1)
        twin.read(0, memoryview(byte))
        received += byte
    assert bytes(received) == b"typed ahead, more than a FIFO holds"


@pytest.mark.parametrize(
    "change",
    [
        lambda state: state.update(type="CmosRtc"),
        lambda state: state.update(version=99),
        lambda state: state["fields"].pop("_ier"),
        lambda state: state["fields"].update(_fifo={"deque": [{"bogus": 1}]}),
        lambda state: state.update(fields=[1, 2]),
    ],
)
def test_damaged_states_are_refused(change) -> None:
    state = busy_serial().state()
    change(state)
    with pytest.raises(ConfigError) as error:
        Serial16550A().restore_state(state)
    assert "\n" not in str(error.value)
