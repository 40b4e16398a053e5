"""The 8042 controller: reset through 0xFE and the answers Linux's i8042 probe expects."""

from __future__ import annotations

import pytest

from hypervisor.devices.bus import Bus, Device
from hypervisor.devices.i8042 import COMMAND_PORT, DATA_PORT, I8042Controller


class Machine:
    def __init__(self) -> None:
        self.resets = 0
        self.controller = I8042Controller(on_reset=self._reset)
        self.bus = Bus("pio", 0x10000)
        self.bus.insert(self.controller.data_port, DATA_PORT, 1, "i8042-data")
        self.bus.insert(self.controller.command_port, COMMAND_PORT, 1, "i8042-command")

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        data = bytearray(1)
        assert self.bus.read(port, memoryview(data))
        return data[0]

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, bytes((value,)))

    def command(self, command: int, parameter: int | None = None) -> int | None:
        """Like Linux's i8042_command(): write, wait for OBF, read the answer (None: timeout)."""
        assert not self.inb(COMMAND_PORT) & 0x02
        self.outb(COMMAND_PORT, command)
        if parameter is not None:
            assert not self.inb(COMMAND_PORT) & 0x02
            self.outb(DATA_PORT, parameter)
        if self.inb(COMMAND_PORT) & 0x01:
            return self.inb(DATA_PORT)
        return None


@pytest.fixture
def m() -> Machine:
    return Machine()


def test_ports_are_bus_devices(m: Machine) -> None:
    assert isinstance(m.controller.data_port, Device)
    assert isinstance(m.controller.command_port, Device)
    assert m.bus.find(0x61) is None  # port 0x61 stays free for the PIT/speaker


def test_status_idle_controller(m: Machine) -> None:
    status = m.inb(COMMAND_PORT)
    assert status & 0x03 == 0  # nothing to read, input buffer empty
    assert status & 0x04  # system flag: self-test passed at power-on


def test_reset_command_calls_back(m: Machine) -> None:
    # Linux's reboot=k: kb_wait() polls until the input buffer is empty, then writes 0xFE.
    for _ in range(3):
        assert not m.inb(COMMAND_PORT) & 0x02
    m.outb(COMMAND_PORT, 0xFE)
    assert m.resets == 1
    assert m.controller.reset_requests == 1


def test_pulse_without_reset_line_does_nothing(m: Machine) -> None:
    m.outb(COMMAND_PORT, 0xFF)  # pulse no line
    m.outb(COMMAND_PORT, 0xFD)  # pulse line 1 only
    assert m.resets == 0


def test_output_port_write_clearing_reset_bit_resets(m: Machine) -> None:
    assert m.command(0xD0) == 0x03
    m.command(0xD1, 0x03)
    assert m.resets == 0
    m.command(0xD1, 0x02)
    assert m.resets == 1


def test_linux_probe_answers(m: Machine) -> None:
    assert m.command(0xAA) == 0x55  # I8042_CMD_CTL_TEST
    ctr = m.command(0x20)  # I8042_CMD_CTL_RCTR
    assert ctr is not None and ctr & 0x04
    assert m.command(0x60, 0x47) is None  # I8042_CMD_CTL_WCTR has no answer
    assert m.command(0x20) == 0x47
    assert m.command(0xAB) == 0x00  # keyboard interface test passes
    m.command(0xAD)
    assert m.command(0x20) & 0x10
    m.command(0xAE)
    assert not m.command(0x20) & 0x10
    m.command(0xA7)
    assert m.command(0x20) & 0x20
    m.command(0xA8)
    assert not m.command(0x20) & 0x20


def test_aux_port_looks_absent(m: Machine) -> None:
    assert m.command(0xD3, 0x5A) is None  # AUX_LOOP: no echo
    assert m.command(0xA9) not in (0x00, 0xFA, 0xFF)  # AUX_TEST: Linux gives up on aux


def test_keyboard_loop_echoes(m: Machine) -> None:
    assert m.command(0xD2, 0xA5) == 0xA5


def test_unknown_commands_and_stray_data_are_ignored(m: Machine) -> None:
    for command in (0x00, 0x13, 0x90, 0xC1, 0xE0):
        m.outb(COMMAND_PORT, command)
    m.outb(DATA_PORT, 0xF4)  # a keyboard command with no keyboard attached
    assert m.inb(COMMAND_PORT) & 0x01 == 0
    assert m.inb(DATA_PORT) == 0x00
    assert m.resets == 0


def test_flush_loop_terminates(m: Machine) -> None:
    """i8042_flush() reads while OBF is set; queued answers drain."""
    m.outb(COMMAND_PORT, 0xAA)
    m.outb(COMMAND_PORT, 0x20)
    drained = 0
    while m.inb(COMMAND_PORT) & 0x01:
        m.inb(DATA_PORT)
        drained += 1
        assert drained < 16
    assert drained == 2
