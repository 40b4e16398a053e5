"""The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), read-only time.

Linux reads the wall-clock time here at boot (arch/x86/kernel/rtc.c, mach_get_cmos_time) and
waits while the "update in progress" bit of register A is set; with no device at these ports
it reads 0xff, sees UIP set forever and spins through thousands of port exits before giving
up. This model answers the time of the host clock in UTC, in BCD 24-hour mode, never busy
(BCD because Linux on x86 always decodes the clock as BCD: RTC_ALWAYS_BCD in
arch/x86/include/asm/mc146818rtc.h).
Writes to the clock registers are accepted and ignored (the guest cannot set the host's time);
the 50 bytes of battery-backed RAM behind them read back what was written.

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
REGISTER_A_DIVIDER_32KHZ = 0x26  # divider 010 (32.768 kHz), rate 0110 (1024 Hz); UIP (bit 7) clear
REGISTER_B_24H_BCD = 0x02  # DM (bit 2) clear: BCD; 24/12 (bit 1) set: 24-hour; no interrupts
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
        elif self._index > REGISTER_D:
            self._ram[self._index] = data[0]

    def _register(self, index: int) -> int:
        if index <= YEAR:
            now = time.gmtime(self._clock())
            fields = {
                SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour,
                DAY_OF_WEEK: (now.tm_wday + 1) % 7 + 1,  # 1 = Sunday; Python's 0 is Monday
                DAY_OF_MONTH: now.tm_mday, MONTH: now.tm_mon, YEAR: now.tm_year % 100,
            }  # fmt: skip
            return _bcd(fields.get(index, 0))  # the alarm registers (odd indices) read as 0
        if index == REGISTER_A:
            return REGISTER_A_DIVIDER_32KHZ
        if index == REGISTER_B:
            return REGISTER_B_24H_BCD
        if index == REGISTER_C:
            return 0  # no interrupt flags: none are ever enabled
        if index == REGISTER_D:
            return REGISTER_D_VALID_RAM
        if index == CENTURY:
            return _bcd(time.gmtime(self._clock()).tm_year // 100)
        return self._ram[index]


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10
