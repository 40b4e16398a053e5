import pytest

from hypervisor.devices.pm import (
    PM_TIMER_HZ,
    RESET_OFFSET,
    RTC_EN,
    RTC_STS,
    S5_SLEEP_TYPE,
    SCI_EN,
    SLP_EN,
    SLP_TYP_SHIFT,
    WAK_STS,
    Pm1Registers,
    PmTimer,
    ResetRegister,
)


def read(device: object, offset: int, size: int) -> int:
    data = bytearray(size)
    device.read(offset, memoryview(data))  # type: ignore[attr-defined]
    return int.from_bytes(data, "little")


def test_pm_timer_counts_at_3_579545_mhz_in_32_bits() -> None:
    now = [1_000_000_000]
    timer = PmTimer(clock=lambda: now[0])
    assert read(timer, 0, 4) == 0
    now[0] += 1_000_000_000  # one second later
    assert read(timer, 0, 4) == PM_TIMER_HZ
    now[0] += 1300 * 1_000_000_000  # past 2**32 ticks: wraps (TMR_VAL_EXT, 32 bits)
    assert read(timer, 0, 4) == (1301 * PM_TIMER_HZ) & 0xFFFFFFFF
    assert read(timer, 1, 1) == ((1301 * PM_TIMER_HZ) >> 8) & 0xFF


def test_a_restored_pm_timer_goes_on_from_its_saved_count() -> None:
    import json

    import pytest

    from hypervisor.errors import ConfigError

    now = [5_000_000_000]
    timer = PmTimer(clock=lambda: now[0])
    now[0] += 2_000_000_000
    saved = json.loads(json.dumps(timer.state()))  # as a snapshot's state.json holds it
    later = [900_000_000_000]  # another process, another monotonic clock
    restored = PmTimer(clock=lambda: later[0])
    restored.restore_state(saved)
    assert read(restored, 0, 4) == 2 * PM_TIMER_HZ
    later[0] += 1_000_000_000
    assert read(restored, 0, 4) == 3 * PM_TIMER_HZ
    for bad in (-1, "12", True, None):
        damaged = {**saved, "fields": {"ticks": bad}}
        with pytest.raises(ConfigError, match="damaged"):
            PmTimer().restore_state(damaged)


def test_s5_with_slp_en_powers_off_and_other_states_do_not() -> None:
    events: list[str] = []
    registers = Pm1Registers(lambda: events.append("off"))
    assert read(registers, 4, 2) & SCI_EN  # always in ACPI mode (SMI_CMD = 0)
    registers.write(4, ((1 << SLP_TYP_SHIFT) | SLP_EN).to_bytes(2, "little"))  # S3: no handler here
    assert events == []
    assert read(registers, 4, 2) & SLP_EN == 0  # SLP_EN reads as 0
    registers.write(4, (S5_SLEEP_TYPE << SLP_TYP_SHIFT).to_bytes(2, "little"))  # no SLP_EN: nothing
    assert events == []
    registers.write(4, (0x2000).to_bytes(2, "little"))  # QEMU's well-known outw(0x604, 0x2000)
    assert events == ["off"]


def test_pm1_status_is_write_one_to_clear_and_enable_keeps_defined_bits() -> None:
    registers = Pm1Registers(lambda: None)
    registers.write(0, (0xFFFF).to_bytes(2, "little"))
    assert read(registers, 0, 2) == 0
    registers.write(2, (0xFFFF).to_bytes(2, "little"))
    assert read(registers, 2, 2) == 0x0521


def test_reset_register_resets_on_rst_cpu() -> None:
    resets: list[int] = []
    register = ResetRegister(lambda: resets.append(1))
    register.write(RESET_OFFSET, b"\x02")  # SYS_RST alone arms, does not reset
    assert resets == []
    register.write(RESET_OFFSET, b"\x06")
    assert resets == [1]


@pytest.mark.parametrize(("offset", "size"), [(0, 4), (0, 1), (1, 2), (2, 1), (3, 1), (0, 2)])
def test_the_pci_config_address_dword_around_the_reset_register_is_an_empty_bus(offset: int, size: int) -> None:
    # Linux's pci_check_type1 writes 0x80000000 to the dword at 0xcf8 and reads it back: the
    # all-ones answer of an absent host bridge, never a reset (devices/pm.py docstring).
    resets: list[int] = []
    register = ResetRegister(lambda: resets.append(1))
    register.write(offset, b"\x06" * size)
    data = bytearray(size)
    register.read(offset, memoryview(data))
    assert data == b"\xff" * size and resets == []
    assert read(register, RESET_OFFSET, 1) == 0  # the reset register itself was not written


def test_s3_with_slp_en_suspends_and_the_wake_sets_wak_sts_and_rtc_sts() -> None:
    events: list[str] = []
    registers = Pm1Registers(lambda: events.append("off"), on_suspend=lambda: events.append("s3"))
    registers.write(2, RTC_EN.to_bytes(2, "little"))
    assert registers.rtc_wake_enabled()
    registers.write(4, (0x2400).to_bytes(2, "little"))  # kvm-unit-tests' s3: SLP_TYP 1 | SLP_EN
    assert events == ["s3"]
    registers.write(4, ((2 << SLP_TYP_SHIFT) | SLP_EN).to_bytes(2, "little"))  # S2: not offered
    assert events == ["s3"]
    registers.woke(by_rtc=True)
    assert read(registers, 0, 2) == WAK_STS | RTC_STS
    registers.write(0, (WAK_STS | RTC_STS).to_bytes(2, "little"))  # write 1 to clear
    assert read(registers, 0, 2) == 0
