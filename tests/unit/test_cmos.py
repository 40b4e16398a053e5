import calendar

import pytest

from hypervisor.devices.cmos import CENTURY, REGISTER_A, REGISTER_B, REGISTER_D, CmosRtc

# 2026-11-28 13:45:09 UTC, a Saturday
MOMENT = calendar.timegm((2026, 11, 28, 13, 45, 9))


def read_register(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, bytes([index]))
    data = bytearray(1)
    rtc.read(1, memoryview(data))
    return data[0]


@pytest.mark.parametrize(
    "index,value", [(0, 0x09), (2, 0x45), (4, 0x13), (6, 0x07), (7, 0x28), (8, 0x11), (9, 0x26), (CENTURY, 0x20)]
)
def test_time_registers_in_bcd(index: int, value: int) -> None:
    assert read_register(CmosRtc(clock=lambda: MOMENT), index) == value


def test_status_registers_say_binary_24h_not_updating_valid() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert read_register(rtc, REGISTER_A) & 0x80 == 0  # UIP clear: Linux does not wait
    assert read_register(rtc, REGISTER_B) & 0x06 == 0x02  # BCD (what Linux on x86 assumes), 24-hour
    assert read_register(rtc, REGISTER_D) == 0x80


def test_nmi_bit_is_not_part_of_the_index_and_ram_keeps_bytes() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert read_register(rtc, 0x80 | 0x04) == 0x13
    rtc.write(0, b"\x40")
    rtc.write(1, b"\x5a")
    assert read_register(rtc, 0x40) == 0x5A
    rtc.write(0, b"\x00")
    rtc.write(1, b"\x33")  # writing the clock is ignored
    assert read_register(rtc, 0x00) == 0x09
