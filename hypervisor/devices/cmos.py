"""The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), read-only time.

Linux reads the wall-clock time here at boot (arch/x86/kernel/rtc.c, mach_get_cmos_time) and
waits while the "update in progress" bit of register A is set; with no device at these ports
it reads 0xff, sees UIP set forever and spins through thousands of port exits before giving
up. This model answers the time of the host clock in UTC, in BCD 24-hour mode, never busy
(BCD because Linux on x86 always decodes the clock as BCD: RTC_ALWAYS_BCD in
arch/x86/include/asm/mc146818rtc.h).
Writes to the clock registers are accepted and ignored (the guest cannot set the host's time);
the 50 bytes of battery-backed RAM behind them read back what was written.

For the ACPI S3 wake-up (hypervisor/machine.py) the alarm is modelled: the three alarm
registers are stored (a value of 0xC0-0xFF matches any, the data sheet's "don't care"), register
B keeps its alarm interrupt enable (AIE; the data mode stays BCD, 24-hour), `next_alarm` says
when the alarm next matches, and register C reports the alarm flag (AF, with IRQF) that waking
from S3 on the alarm sets, cleared by reading C. No interrupt is raised on IRQ 8 while the
machine runs. Register A shows the update-in-progress bit (UIP) during the last 2.228 ms of
every second (244 us before the update and its 1984 us duration at 32.768 kHz), so a guest that
waits for an update edge, as kvm-unit-tests' s3 does, sees one.

Register numbers and bits: Motorola MC146818A data sheet, "Address Map" and registers A-D.
The index is shared by the two ports, so an access runs under the device's bus lock
(hypervisor.devices.gate); the device has none of its own and no effects.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hypervisor.devices.state import StatefulDevice

INDEX_PORT_OFFSET = 0
DATA_PORT_OFFSET = 1
PORT_COUNT = 2
NMI_DISABLE_BIT = 0x80  # bit 7 of the index byte masks NMIs on a PC; not part of the index

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REGISTER_A, REGISTER_B, REGISTER_C, REGISTER_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32  # the PC/AT's century byte (ACPI FADT default), which Linux reads
SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM = 0x01, 0x03, 0x05
ALARM_DONT_CARE = 0xC0  # an alarm byte with its two top bits set matches every value
REGISTER_A_DIVIDER_32KHZ = 0x26  # divider 010 (32.768 kHz), rate 0110 (1024 Hz); UIP (bit 7) clear
REGISTER_A_UIP = 0x80
UPDATE_WINDOW_SECONDS = 0.002228  # UIP is set 244 us before the update, which takes 1984 us
REGISTER_B_24H_BCD = 0x02  # DM (bit 2) clear: BCD; 24/12 (bit 1) set: 24-hour
REGISTER_B_AIE = 0x20  # alarm interrupt enable, the one enable bit stored
REGISTER_C_IRQF_AF = 0xA0  # IRQF and AF: an enabled alarm fired
REGISTER_D_VALID_RAM = 0x80  # VRT: the battery is good
RAM_SIZE = 128


class CmosRtc(StatefulDevice):
    """Two one-byte ports as one two-byte bus range: offset 0 index, offset 1 data."""

    STATE_FIELDS = ("_index", "_ram")  # the time is the host's, never saved

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._ram = bytearray(RAM_SIZE)

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        value = self._index if offset == INDEX_PORT_OFFSET else self._register(self._index)
        data[:] = bytes([value]) * len(data)

    def _write(self, offset: int, data: bytes) -> None:
        if offset == INDEX_PORT_OFFSET:
            self._index = data[0] & ~NMI_DISABLE_BIT & (RAM_SIZE - 1)
        elif self._index > REGISTER_D or self._index in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
            self._ram[self._index] = data[0]
        elif self._index == REGISTER_B:
            self._ram[REGISTER_B] = data[0] & REGISTER_B_AIE

    def next_alarm(self, after: float) -> float | None:
        """The host time of the first whole second after `after` at which the alarm matches,
        or None when the alarm interrupt is not enabled (or matches nothing in a day)."""
        return self._serialised(self._next_alarm, after)

    def _next_alarm(self, after: float) -> float | None:
        if not self._ram[REGISTER_B] & REGISTER_B_AIE:
            return None
        alarm = (self._ram[HOURS_ALARM], self._ram[MINUTES_ALARM], self._ram[SECONDS_ALARM])
        start = int(after) + 1
        for moment in range(start, start + 24 * 3600):
            now = time.gmtime(moment)
            if all(wanted >= ALARM_DONT_CARE or wanted == _bcd(value)
                   for wanted, value in zip(alarm, (now.tm_hour, now.tm_min, now.tm_sec), strict=True)):  # fmt: skip
                return float(moment)
        return None

    def alarm_fired(self) -> None:
        """The alarm woke the machine: register C shows AF until the guest reads it."""
        self._serialised(self._ram.__setitem__, REGISTER_C, REGISTER_C_IRQF_AF)

    def _register(self, index: int) -> int:
        if index <= YEAR:
            now = time.gmtime(self._clock())
            fields = {
                SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour,
                DAY_OF_WEEK: (now.tm_wday + 1) % 7 + 1,  # 1 = Sunday; Python's 0 is Monday
                DAY_OF_MONTH: now.tm_mday, MONTH: now.tm_mon, YEAR: now.tm_year % 100,
            }  # fmt: skip
            if index in fields:
                return _bcd(fields[index])
            return self._ram[index]  # the alarm registers
        if index == REGISTER_A:
            updating = self._clock() % 1.0 >= 1.0 - UPDATE_WINDOW_SECONDS
            return REGISTER_A_DIVIDER_32KHZ | (REGISTER_A_UIP if updating else 0)
        if index == REGISTER_B:
            return REGISTER_B_24H_BCD | self._ram[REGISTER_B]
        if index == REGISTER_C:
            flags, self._ram[REGISTER_C] = self._ram[REGISTER_C], 0  # §Register C: read clears
            return flags
        if index == REGISTER_D:
            return REGISTER_D_VALID_RAM
        if index == CENTURY:
            return _bcd(time.gmtime(self._clock()).tm_year // 100)
        return self._ram[index]


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10
