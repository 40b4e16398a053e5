"""ACPI fixed hardware in I/O space: the PM1a event and control blocks, the PM timer, and the
reset register, as the FADT (hypervisor/boot/acpi.py) describes them.

ACPI 6.5 §4.8 "ACPI Hardware Specification": PM1 status/enable (§4.8.3.1, table 4.13), PM1
control with SCI_EN, SLP_TYP and SLP_EN (§4.8.3.2, table 4.16), the power management timer
(§4.8.3.3: 3.579545 MHz, 24 or 32 bits, TMR_VAL_EXT in the FADT), and the reset register
(§4.8.3.6). The ports are those of QEMU's PIIX4 PM block as SeaBIOS programs it (base 0x600:
event block 0x600, control 0x604, timer 0x608), so guests written for QEMU that hard-code them
(the well-known `outw(0x604, 0x2000)` power-off) work too, and the reset register is the PIIX
reset control register at 0xcf9 (value 0x06).

0xcf9 is a byte inside the dword at 0xcf8 that PCI configuration mechanism #1 calls
CONFIG_ADDRESS (PCI Local Bus spec 3.0 §3.2.2.3.2): a PIIX decodes a byte access to 0xcf9 as its
reset control register and passes every other access to 0xcf8-0xcfb to its PCI host bridge.
pyhv describes no PCI host bridge, so those other accesses answer as an empty bus does
(all-ones, writes dropped), which is how Linux's pci_check_type1/type2 conclude "no PCI".

A write of SLP_EN with the S5 sleep type (the \\_S5 package of the DSDT) powers the machine off;
with QEMU's S3 sleep type (1) it suspends to RAM (the machine parks the vCPUs and resumes them at
the FACS waking vector when the RTC alarm fires); other sleep types (S1, S2, S4) are not
implemented and are ignored with a warning, as a system without those states would do. pyhv
never raises the SCI: no fixed event (power button, timer carry) is generated, so the status
bits read back as 0 except WAK_STS and RTC_STS after a wake from S3.

The devices have no locks of their own: each runs under the bus lock of its own
(hypervisor.devices.gate), and a power-off or reset request is an effect, performed after that
lock is released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hypervisor.devices.gate import GatedDevice
from hypervisor.devices.state import StatefulDevice

log = logging.getLogger(__name__)

PM_BASE_PORT = 0x600
PM1A_EVENT_PORT = PM_BASE_PORT  # PM1_STS (2 bytes), then PM1_EN (2 bytes)
PM1_EVENT_LENGTH = 4
PM1A_CONTROL_PORT = PM_BASE_PORT + 4
PM1_CONTROL_LENGTH = 2
PM_TIMER_PORT = PM_BASE_PORT + 8
PM_TIMER_LENGTH = 4
RESET_PORT = 0xCF9  # PIIX reset control register (Intel 82371AB datasheet §4.1.5)
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # the dword the reset register shares (see the docstring)
RESET_WINDOW_SIZE = 4
RESET_OFFSET = RESET_PORT - PCI_CONFIG_ADDRESS_PORT
PCI_CONFIG_DATA_PORT = 0xCFC  # CONFIG_DATA: nothing answers it either
PCI_CONFIG_DATA_SIZE = 4
RESET_VALUE = 0x06  # SYS_RST | RST_CPU: a hard reset
RESET_CPU_BIT = 0x04  # RST_CPU: the write that starts the reset

PM_TIMER_HZ = 3_579_545  # §4.8.3.3
PM_TIMER_MASK = 0xFFFF_FFFF  # a 32-bit counter: the FADT sets TMR_VAL_EXT

# PM1 control bits (§4.8.3.2.1 table 4.16).
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
# The sleep type the DSDT's \_S5 package names (QEMU's PIIX4 value, so hard-coded guests agree).
S5_SLEEP_TYPE = 0
# QEMU's PIIX4 value for S3 (suspend to RAM), which kvm-unit-tests' s3 writes. The DSDT has no
# \_S3 package, so an OS that reads it (Linux) does not offer suspend; a guest that knows the
# value suspends and is woken by the RTC alarm (hypervisor/machine.py).
S3_SLEEP_TYPE = 1
WAK_STS = 1 << 15  # PM1_STS: the system woke from a sleeping state (§4.8.3.1.1 table 4.13)
RTC_STS = 1 << 10  # PM1_STS: the RTC alarm fired
RTC_EN = 1 << 10  # PM1_EN: the RTC alarm may wake the system
# PM1 status bits a guest can clear (§4.8.3.1.1 table 4.13: write 1 to clear).
PM1_STATUS_BITS = 0x8D31
PM1_ENABLE_BITS = 0x0521  # TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN


def _fill(data: memoryview, value: int) -> None:
    data[:] = (value & ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")


class PmTimer(StatefulDevice):
    """The free-running ACPI PM timer: ticks since the machine started, at 3.579545 MHz.

    Its state is the tick count: a restored machine's timer goes on from the value it had at the
    save, as the TSC and the KVM clock do, instead of jumping back to 0 (§4.8.3.3: the counter
    only ever counts up, wrapping at 24 or 32 bits).
    """

    STATE_FIELDS = ("ticks",)

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._start = clock()

    @property
    def ticks(self) -> int:
        """Ticks since the machine started, unwrapped."""
        return (self._clock() - self._start) * PM_TIMER_HZ // 1_000_000_000

    @ticks.setter
    def ticks(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"a PM timer tick count must be a non-negative integer, not {value!r}")
        self._start = self._clock() - value * 1_000_000_000 // PM_TIMER_HZ

    def value(self) -> int:
        return self.ticks & PM_TIMER_MASK

    def read(self, offset: int, data: memoryview) -> None:
        # §4.8.3.3: the register is read as a 32-bit quantity; narrower reads get its low part
        # at that offset, which is how a byte-wise reader would see it.
        _fill(data, self._access(self.value) >> (8 * offset))

    def write(self, offset: int, data: bytes) -> None:
        pass  # read-only


class Pm1Registers(StatefulDevice):
    """PM1a status, enable (the event block) and control, one device over both blocks.

    The event block is [0, 4) (status at 0, enable at 2) and the control block [4, 6), matching
    the port layout above, so one bus range covers 0x600-0x605.
    """

    CONTROL_OFFSET = PM1A_CONTROL_PORT - PM1A_EVENT_PORT
    SIZE = CONTROL_OFFSET + PM1_CONTROL_LENGTH

    STATE_FIELDS = ("_registers",)

    def __init__(self, on_power_off: Callable[[], None], on_suspend: Callable[[], None] | None = None) -> None:
        self._on_power_off = on_power_off
        self._on_suspend = on_suspend  # S3: the machine parks the vCPUs and waits for a wake event
        self._registers = bytearray(self.SIZE)
        # SMI_CMD is 0 in the FADT: the machine is always in ACPI mode, so SCI_EN reads as 1
        # (§4.8.3.2.1: "hardware-only ... if SMI_CMD is zero").
        self._registers[self.CONTROL_OFFSET] = SCI_EN

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(self._registers[offset + index] if offset + index < self.SIZE else 0xFF
                        for index in range(len(data)))  # fmt: skip

    def _write(self, offset: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            position = offset + index
            if position < 2:  # PM1_STS: write 1 to clear
                self._registers[position] &= ~(byte & (PM1_STATUS_BITS >> (8 * position))) & 0xFF
            elif position < 4:  # PM1_EN
                self._registers[position] = byte & (PM1_ENABLE_BITS >> (8 * (position - 2))) & 0xFF
            elif position < self.SIZE:
                self._registers[position] = byte
        self._registers[self.CONTROL_OFFSET] |= SCI_EN
        control = int.from_bytes(self._registers[self.CONTROL_OFFSET : self.SIZE], "little")
        if control & SLP_EN:
            # SLP_EN is write-only and reads as 0 (table 4.16); the write is the command.
            self._registers[self.CONTROL_OFFSET + 1] &= ~(SLP_EN >> 8) & 0xFF
            sleep_type = (control & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if sleep_type == S5_SLEEP_TYPE:
                log.debug("guest wrote SLP_EN with the S5 sleep type: power off")
                self._post(self._on_power_off)
            elif sleep_type == S3_SLEEP_TYPE and self._on_suspend is not None:
                log.debug("guest wrote SLP_EN with the S3 sleep type: suspend to RAM")
                self._post(self._on_suspend)
            else:
                log.warning("the guest asked for ACPI sleep type %d, which pyhv does not implement; "
                            "S5 (power off) and S3 (suspend to RAM) are offered", sleep_type)  # fmt: skip

    def rtc_wake_enabled(self) -> bool:
        return bool(self._serialised(lambda: self._registers[2] | self._registers[3] << 8) & RTC_EN)

    def woke(self, by_rtc: bool) -> None:
        """Resume from S3: WAK_STS, and RTC_STS when the alarm woke the system (§4.8.3.1.1)."""
        self._serialised(self._set_status, WAK_STS | (RTC_STS if by_rtc else 0))

    def _set_status(self, bits: int) -> None:
        status = (self._registers[0] | self._registers[1] << 8) | bits
        self._registers[0:2] = status.to_bytes(2, "little")


def is_reset_register_access(offset: int, size: int) -> bool:
    """Whether an access to the dword at 0xcf8 is the reset register's (a byte at 0xcf9)."""
    return offset == RESET_OFFSET and size == 1


class ResetControl:
    """The reset register's state: the last value written, without RST_CPU (which the PIIX
    clears once the reset starts). Shared by the empty-bus window below and the PCI host
    (hypervisor/devices/pci.py), which both answer for 0xcf9; their owner serialises it."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.value = 0

    def write(self, value: int) -> bool:
        """Latches `value`; True when it asks for a reset (the owner posts `on_reset`)."""
        self.value = value & ~RESET_CPU_BIT
        if value & RESET_CPU_BIT:
            log.debug("guest wrote %#x to the reset register", value)
            return True
        return False


class ResetRegister(GatedDevice):
    """The FADT's reset register (§4.8.3.6): writing the reset value resets the machine. On the
    bus it spans the dword at 0xcf8 it shares with PCI CONFIG_ADDRESS (module docstring)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._reset = ResetControl(on_reset)

    def read(self, offset: int, data: memoryview) -> None:
        if is_reset_register_access(offset, len(data)):
            _fill(data, self._reset.value)
        else:
            data[:] = b"\xff" * len(data)  # CONFIG_ADDRESS of a PCI host bridge that is not there

    def write(self, offset: int, data: bytes) -> None:
        if is_reset_register_access(offset, len(data)):
            self._access(self._write, data[0])

    def _write(self, value: int) -> None:
        if self._reset.write(value):
            self._post(self._reset.on_reset)
