import calendar

import pytest

from hypervisor.devices.cmos import (
    CENTURY,
    HOURS_ALARM,
    MINUTES_ALARM,
    REGISTER_A,
    REGISTER_A_UIP,
    REGISTER_B,
    REGISTER_B_AIE,
    REGISTER_C,
    REGISTER_D,
    SECONDS_ALARM,
    CmosRtc,
)

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


def write_register(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, bytes([index]))
    rtc.write(1, bytes([value]))


def test_uip_shows_only_in_the_update_window_before_each_second() -> None:
    assert read_register(CmosRtc(clock=lambda: MOMENT + 0.5), REGISTER_A) & REGISTER_A_UIP == 0
    assert read_register(CmosRtc(clock=lambda: MOMENT + 0.999), REGISTER_A) & REGISTER_A_UIP


def test_the_alarm_matches_its_registers_and_dont_care_bytes() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert rtc.next_alarm(MOMENT) is None  # AIE clear: no alarm
    for index in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
        write_register(rtc, index, 0xC0)
    write_register(rtc, REGISTER_B, 0x02 | REGISTER_B_AIE)
    assert read_register(rtc, REGISTER_B) == 0x02 | REGISTER_B_AIE  # the mode bits stay BCD, 24 h
    assert rtc.next_alarm(MOMENT + 0.3) == MOMENT + 1  # every second
    write_register(rtc, SECONDS_ALARM, 0x30)  # hh:mm:30, any hour and minute
    assert rtc.next_alarm(MOMENT) == MOMENT + 21
    write_register(rtc, HOURS_ALARM, 0x13)
    write_register(rtc, MINUTES_ALARM, 0x44)  # 13:44:30 is past: tomorrow's
    assert rtc.next_alarm(MOMENT) == MOMENT + 24 * 3600 - 39
    write_register(rtc, HOURS_ALARM, 0x99)  # no hour 99: never
    assert rtc.next_alarm(MOMENT) is None


def test_register_c_reports_the_alarm_once() -> None:
    rtc = CmosRtc(clock=lambda: MOMENT)
    assert read_register(rtc, REGISTER_C) == 0
    rtc.alarm_fired()
    assert read_register(rtc, REGISTER_C) == 0xA0
    assert read_register(rtc, REGISTER_C) == 0
