"""The PS/2 controller (Intel 8042) just far enough for reset and for Linux's probe.

The PC's 8042 answers at two ports that are not adjacent: 0x60 (data) and 0x64 (status on read,
command on write). Port 0x61 between them belongs to the PIT/speaker, which KVM's in-kernel PIT
owns, so the controller is not one range: `I8042Controller` exposes two one-byte bus devices,
`data_port` (put it at 0x60) and `command_port` (put it at 0x64).

What the guest sees: a controller that passes its self-test, with a keyboard port on which
nothing ever types and no auxiliary (mouse) port. The command set follows the IBM PC/AT
Technical Reference "Keyboard Controller" section and the commands Linux's
drivers/input/serio/i8042.c sends (include/linux/i8042.h). The interesting command is 0xFE,
"pulse output line 0" (the CPU reset line): Linux's `reboot=k` writes it, and the machine ends the
run with a reset outcome through `on_reset`. No keyboard or mouse data ever arrives, so IRQ 1 and
IRQ 12 are never raised and no interrupt line is needed.

Unknown commands are logged at debug level and ignored; nothing the guest writes raises.
Both ports share the controller's one bus lock (hypervisor.devices.gate: `_Port.gate_owner`), and
the reset request is an effect, performed after that lock is released.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from hypervisor.devices.state import StatefulDevice

log = logging.getLogger(__name__)

# Ports, for the machine (IBM PC/AT Technical Reference).
DATA_PORT = 0x60
COMMAND_PORT = 0x64

# Status register bits (include/linux/i8042.h I8042_STR_*).
STATUS_OUTPUT_FULL = 0x01
STATUS_INPUT_FULL = 0x02
STATUS_SYSTEM_FLAG = 0x04  # set once the controller passed its self-test
STATUS_LAST_WAS_COMMAND = 0x08
STATUS_NOT_INHIBITED = 0x10  # keyboard lock switch open
STATUS_AUX_DATA = 0x20  # the byte in the output buffer came from the aux port

# Controller commands (written to 0x64).
CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KEYBOARD = 0xAB
CMD_DISABLE_KEYBOARD = 0xAD
CMD_ENABLE_KEYBOARD = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KEYBOARD_OUTPUT = 0xD2  # loop a byte back as if the keyboard sent it
CMD_WRITE_AUX_OUTPUT = 0xD3  # loop a byte back as if the mouse sent it
CMD_WRITE_TO_AUX = 0xD4
CMD_PULSE_RESET = 0xFE  # pulse output line 0 (bit 0 of the 0xF0-0xFF range) low: CPU reset
PULSE_COMMANDS = range(0xF0, 0x100)

# Command byte bits (I8042_CTR_*).
CTR_KEYBOARD_INTERRUPT = 0x01
CTR_AUX_INTERRUPT = 0x02
CTR_SYSTEM_FLAG = 0x04
CTR_KEYBOARD_DISABLED = 0x10
CTR_AUX_DISABLED = 0x20
CTR_TRANSLATE = 0x40
# What firmware leaves: keyboard interrupt on, translation on, system flag set, mouse off.
INITIAL_COMMAND_BYTE = CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE

SELF_TEST_PASSED = 0x55  # I8042_RET_CTL_TEST
INTERFACE_TEST_PASSED = 0x00
INTERFACE_TEST_CLOCK_STUCK_LOW = 0x01  # the answer for the absent aux port: Linux then skips it
# Output port: bit 0 = CPU not in reset, bit 1 = A20 enabled (what a running PC shows).
OUTPUT_PORT_RUNNING = 0x03
OUTPUT_PORT_RESET_LINE = 0x01
INPUT_PORT_VALUE = 0xA0  # keyboard not inhibited, "enhanced" (no manufacturing jumper)


class _Port:
    """One of the controller's two single-byte bus devices; its accesses run under the
    controller's lock, a wider access as a run of byte accesses."""

    def __init__(self, controller: I8042Controller, read: Callable[[], int], write: Callable[[int], None]) -> None:
        self._controller = controller
        self._read = read
        self._write = write

    def gate_owner(self) -> I8042Controller:
        return self._controller

    def read(self, offset: int, data: memoryview) -> None:
        self._controller._access(self._read_bytes, data)

    def write(self, offset: int, data: bytes) -> None:
        self._controller._access(self._write_bytes, data)

    def _read_bytes(self, data: memoryview) -> None:
        for index in range(len(data)):
            data[index] = self._read()

    def _write_bytes(self, data: bytes) -> None:
        for value in data:
            self._write(value)


class I8042Controller(StatefulDevice):
    """The 8042 state; bus devices are `data_port` (0x60) and `command_port` (0x64)."""

    STATE_FIELDS = ("_output", "_command_byte", "_awaiting_parameter", "_last_was_command", "_output_port")

    def __init__(self, on_reset: Callable[[], None] | None = None) -> None:
        self._on_reset = on_reset or (lambda: None)
        self._output: collections.deque[tuple[int, bool]] = collections.deque()  # (byte, from aux)
        self._command_byte = INITIAL_COMMAND_BYTE
        self._awaiting_parameter: int | None = None
        self._last_was_command = False
        self._output_port = OUTPUT_PORT_RUNNING
        self.reset_requests = 0
        self.data_port = _Port(self, self._read_data, self._write_data)
        self.command_port = _Port(self, self._read_status, self._write_command)

    def set_reset_callback(self, on_reset: Callable[[], None]) -> None:
        self._serialised(setattr, self, "_on_reset", on_reset)

    def _pulse_reset(self, why: str) -> None:
        log.info("i8042: %s", why)
        self.reset_requests += 1
        # An effect: the machine's callback may stop vCPUs or touch this device.
        self._post(self._on_reset)

    # ---------------------------------------------------------------- port 0x64

    def _read_status(self) -> int:
        status = STATUS_NOT_INHIBITED
        if self._command_byte & CTR_SYSTEM_FLAG:
            status |= STATUS_SYSTEM_FLAG
        if self._last_was_command:
            status |= STATUS_LAST_WAS_COMMAND
        if self._output:
            status |= STATUS_OUTPUT_FULL
            if self._output[0][1]:
                status |= STATUS_AUX_DATA
        # The input buffer is drained instantly, so STATUS_INPUT_FULL is never set.
        return status

    def _write_command(self, command: int) -> None:
        self._last_was_command = True
        self._awaiting_parameter = None
        if self._execute(command):
            self._pulse_reset(f"guest pulsed the reset line (command {command:#04x})")

    def _execute(self, command: int) -> bool:
        """Run one controller command; True when it pulses the CPU reset line."""
        if command == CMD_READ_COMMAND_BYTE:
            self._answer(self._command_byte)
        elif command in (
            CMD_WRITE_COMMAND_BYTE,
            CMD_WRITE_OUTPUT_PORT,
            CMD_WRITE_KEYBOARD_OUTPUT,
            CMD_WRITE_AUX_OUTPUT,
            CMD_WRITE_TO_AUX,
        ):
            self._awaiting_parameter = command
        elif command == CMD_SELF_TEST:
            self._command_byte |= CTR_SYSTEM_FLAG
            self._answer(SELF_TEST_PASSED)
        elif command == CMD_TEST_KEYBOARD:
            self._answer(INTERFACE_TEST_PASSED)
        elif command == CMD_TEST_AUX:
            self._answer(INTERFACE_TEST_CLOCK_STUCK_LOW)
        elif command == CMD_DISABLE_KEYBOARD:
            self._command_byte |= CTR_KEYBOARD_DISABLED
        elif command == CMD_ENABLE_KEYBOARD:
            self._command_byte &= ~CTR_KEYBOARD_DISABLED
        elif command == CMD_DISABLE_AUX:
            self._command_byte |= CTR_AUX_DISABLED
        elif command == CMD_ENABLE_AUX:
            self._command_byte &= ~CTR_AUX_DISABLED
        elif command == CMD_READ_INPUT_PORT:
            self._answer(INPUT_PORT_VALUE)
        elif command == CMD_READ_OUTPUT_PORT:
            self._answer(self._output_port)
        elif command in PULSE_COMMANDS:
            # Bits 3:0 low select the lines to pulse; line 0 is the CPU reset (0xFE, 0xF0, ...).
            return not command & OUTPUT_PORT_RESET_LINE
        else:
            log.debug("i8042: ignoring controller command %#04x", command)
        return False

    def _answer(self, value: int, from_aux: bool = False) -> None:
        self._output.append((value, from_aux))

    # ---------------------------------------------------------------- port 0x60

    def _read_data(self) -> int:
        if self._output:
            return self._output.popleft()[0]
        return 0x00

    def _write_data(self, value: int) -> None:
        self._last_was_command = False
        command, self._awaiting_parameter = self._awaiting_parameter, None
        if command == CMD_WRITE_COMMAND_BYTE:
            self._command_byte = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            # Clearing bit 0 of the output port holds the CPU in reset.
            if not value & OUTPUT_PORT_RESET_LINE:
                self._pulse_reset("guest cleared the reset bit of the output port")
        elif command == CMD_WRITE_KEYBOARD_OUTPUT:
            self._answer(value)
        elif command in (CMD_WRITE_AUX_OUTPUT, CMD_WRITE_TO_AUX):
            # There is no aux port: the byte goes nowhere and nothing answers, so Linux's
            # AUX_LOOP command times out and it registers no mouse port.
            log.debug("i8042: byte %#04x for the absent aux port dropped", value)
        else:
            # A byte for the keyboard device; no keyboard is attached, so nothing answers.
            log.debug("i8042: byte %#04x for the absent keyboard dropped", value)
