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
    "index,value", [(0, 9), (2, 45), (4, 13), (6, 7), (7, 28), (8, 11), (9, 26), (CENTURY, 20)]
)
def test_time_registers_in_binary(index: int, value: int) -> None:
    assert read_register(CmosRtc(clock=lambda: MOMENT), index) == value


def test_status_registers_say_binary_24h_not_updating_valid() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert read_register(rtc, REGISTER_A) & 0x80 == 0  # UIP clear: Linux does not wait
    assert read_register(rtc, REGISTER_B) & 0x06 == 0x06  # binary, 24-hour
    assert read_register(rtc, REGISTER_D) == 0x80


def test_nmi_bit_is_not_part_of_the_index_and_ram_keeps_bytes() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert read_register(rtc, 0x80 | 0x04) == 13
    rtc.write(0, b"\x40")
    rtc.write(1, b"\x5a")
    assert read_register(rtc, 0x40) == 0x5A
    rtc.write(0, b"\x00")
    rtc.write(1, b"\x33")  # writing the clock is ignored
    assert read_register(rtc, 0x00) == 9
