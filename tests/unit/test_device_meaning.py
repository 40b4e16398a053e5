"""What a device made of an access: names from the data sheets, state only peeked at."""

from __future__ import annotations

import collections
import copy

import pytest

from hypervisor.debug.device_meaning import Meaning, device_meaning
from hypervisor.devices.cmos import CmosRtc
from hypervisor.devices.debug_exit import DebugExit
from hypervisor.devices.serial import Serial16550A
from hypervisor.vcpu.events import Halt, MmioAccess, PortIo


def io(device: str | None, offset: int, data: bytes, write: bool = True, port: int = 0x3F8) -> PortIo:
    return PortIo(0, port + offset, len(data), 1, write, data, device, offset)


def mmio(device: str | None, offset: int, data: bytes, write: bool = True) -> MmioAccess:
    return MmioAccess(0, 0xD000_0000 + offset, len(data), write, data, device, offset)


def text(event: PortIo | MmioAccess, device: object = None) -> str:
    meaning = device_meaning(event, device)
    assert meaning is not None
    return str(meaning)


def test_uart_transmit_shows_the_character() -> None:
    uart = Serial16550A()
    assert text(io("COM1", 0, b"L"), uart) == "serial THR 'L'"
    assert text(io("COM1", 0, b"\n"), uart) == "serial THR '\\n'"
    assert device_meaning(io("COM1", 0, b"L"), uart) == Meaning("serial", "THR", "'L'")


def test_uart_registers_by_offset_and_direction() -> None:
    uart = Serial16550A()
    assert text(io("COM1", 5, b"\x60", write=False), uart) == "serial LSR -> 0x60"
    assert text(io("COM1", 2, b"\xc1", write=False), uart) == "serial IIR -> 0xc1"
    assert text(io("COM1", 2, b"\x07"), uart) == "serial FCR 0x07"
    assert text(io("COM1", 3, b"\x03"), uart) == "serial LCR 0x03"
    assert text(io("COM1", 4, b"\x0b"), uart) == "serial MCR 0x0b"
    assert text(io("COM1", 6, b"\xb0", write=False), uart) == "serial MSR -> 0xb0"
    assert text(io("COM1", 7, b"\x55"), uart) == "serial SCR 0x55"
    assert text(io("COM1", 1, b"\x01"), uart) == "serial IER 0x01"
    assert text(io("COM1", 0, b"a", write=False), uart) == "serial RBR -> 'a'"


def test_uart_divisor_latch_follows_the_devices_dlab() -> None:
    uart = Serial16550A()
    uart.write(3, b"\x80")  # LCR.DLAB
    assert text(io("COM1", 0, b"\x0c"), uart) == "serial DLL 0x0c"
    assert text(io("COM1", 1, b"\x00"), uart) == "serial DLM 0x00"
    uart.write(3, b"\x03")
    assert text(io("COM1", 0, b"A"), uart) == "serial THR 'A'"


def test_uart_without_the_device_names_both_registers() -> None:
    assert text(io("COM1", 0, b"A")) == "serial THR/DLL 0x41 ('A')"
    assert text(io("COM1", 1, b"\x00")) == "serial IER/DLM 0x00"


def state(device: object) -> dict[str, object]:
    """The device's plain-data attributes (registers, FIFOs, RAM), copied."""
    plain = (int, bool, bytes, bytearray, collections.deque, list, str)
    return {key: copy.copy(value) for key, value in vars(device).items() if isinstance(value, plain)}


def test_describing_never_changes_the_device() -> None:
    uart = Serial16550A()
    uart.feed(b"xyz")
    rtc = CmosRtc(clock=lambda: 0.0)
    rtc.write(0, b"\x0a")
    for device, event in ((uart, io("COM1", 0, b"x", write=False)), (uart, io("COM1", 5, b"\x61", write=False)),
                          (rtc, io("CMOS RTC", 1, b"\x26", write=False, port=0x70))):  # fmt: skip
        before = state(device)
        device_meaning(event, device)
        assert state(device) == before


def test_cmos_index_and_data() -> None:
    assert text(io("CMOS RTC", 0, b"\x0a", port=0x70)) == "cmos index 0x0a"
    assert text(io("CMOS RTC", 0, b"\x8b", port=0x70)) == "cmos index 0x0b (NMI off)"
    rtc = CmosRtc(clock=lambda: 0.0)
    rtc.write(0, b"\x0a")
    assert text(io("CMOS RTC", 1, b"\x26", write=False, port=0x70), rtc) == "cmos data[0x0a] -> 0x26"
    assert text(io("CMOS RTC", 1, b"\x26", write=False, port=0x70)) == "cmos data -> 0x26"


def test_i8042_command_and_data() -> None:
    assert text(io("i8042 command", 0, b"\xfe", port=0x64)) == "i8042 command 0xfe (pulse reset)"
    assert text(io("i8042 command", 0, b"\x1c", write=False, port=0x64)) == "i8042 status -> 0x1c"
    assert text(io("i8042 data", 0, b"\x55", write=False, port=0x60)) == "i8042 data -> 0x55"


def test_debug_exit_status_in_both_flavours() -> None:
    assert text(io("debug-exit", 0, b"\x05", port=0x501), DebugExit(lambda status: None)) == "debug-exit status 5"
    qemu = DebugExit(lambda status: None, qemu_compatible=True)
    assert text(io("debug-exit", 0, b"\x05", port=0x501), qemu) == "debug-exit status 11"
    assert text(io("isa-debug-exit", 0, b"\x05", port=0xF4)) == "debug-exit status 11"


def test_fw_cfg_selector_names_the_item() -> None:
    assert text(io("fw_cfg", 0, b"\x19\x00", port=0x510)) == "fw_cfg select 0x0019 (FILE_DIR)"
    assert text(io("fw_cfg", 0, b"\x21\x00", port=0x510)) == "fw_cfg select 0x0021 (file 1)"
    assert text(io("fw_cfg", 1, b"Q", write=False, port=0x510)) == "fw_cfg data -> 0x51"


def test_acpi_registers() -> None:
    assert text(io("ACPI PM1a", 4, b"\x00\x20", port=0x600)) == "acpi PM1_CNT 0x2000 (SLP_EN S5)"
    assert text(io("ACPI PM1a", 0, b"\x00\x00", write=False, port=0x600)) == "acpi PM1_STS -> 0x0000"
    assert text(io("ACPI PM timer", 0, b"\x01\x00\x00\x00", write=False, port=0x608)).startswith("acpi PM_TMR -> ")
    assert text(io("ACPI reset register", 1, b"\x06", port=0xCF8)) == "acpi RESET_REG 0x06 (reset)"
    # The rest of the dword at 0xcf8 is PCI CONFIG_ADDRESS, which Linux probes on every boot.
    probe = io("ACPI reset register", 0, b"\x00\x00\x00\x80", port=0xCF8)
    assert text(probe) == "pci CONFIG_ADDRESS 0x80000000 (no PCI host bridge)"


def test_virtio_mmio_registers() -> None:
    assert text(mmio("vda", 0x50, b"\x00\x00\x00\x00")) == "virtio vda QueueNotify queue 0 notify"
    assert text(mmio("vda", 0x00, b"virt", write=False)) == "virtio vda MagicValue -> 0x74726976"
    assert (
        text(mmio("vda", 0x70, b"\x0f\x00\x00\x00"))
        == "virtio vda Status 0x0000000f (ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK)"
    )
    assert text(mmio("vda", 0x30, b"\x01\x00\x00\x00")) == "virtio vda QueueSel 1"
    assert text(mmio("vda", 0x114, b"\x00" * 4, write=False)) == "virtio vda config+0x14 -> 0x00000000"


def test_virtio_family_comes_from_the_transports_device() -> None:
    class Transport:  # what MmioTransport exposes: .device with a virtio DeviceID
        class device:  # noqa: N801
            device_id = 2

    assert text(mmio("vda", 0x50, b"\x00" * 4), Transport()) == "virtio-blk vda QueueNotify queue 0 notify"


def test_unknown_devices_and_other_exits() -> None:
    assert text(io("pc-testdev ioport", 2, b"\x01", port=0xE0)) == "pc-testdev ioport +0x2 0x01"
    assert text(io(None, 0, b"\x01", port=0x1234)) == "unmapped port +0x0 0x01"
    assert device_meaning(Halt(0)) is None


@pytest.mark.parametrize("offset", [8, 100, -1])
def test_odd_uart_offsets_do_not_fail(offset: int) -> None:
    assert text(io("COM1", offset, b"\x00")).startswith("serial +")


def test_pci_config_vtd_and_edu_accesses_are_named() -> None:
    host = "PCI host (and reset register)"
    assert text(io(host, 0, (0x8000_1004).to_bytes(4, "little"), port=0xCF8)) == (
        "pci CONFIG_ADDRESS 0x80001004 (00:02.0 register 0x04)")
    assert text(io(host, 4, b"\x34\x12", write=False, port=0xCF8)) == "pci CONFIG_DATA -> 0x1234"
    assert text(io(host, 1, b"\x06", port=0xCF8)) == "acpi RESET_REG 0x06 (reset)"
    assert text(mmio("intel-iommu", 0x18, (1 << 31).to_bytes(4, "little"))) == "vt-d GCMD 0x80000000"
    assert text(mmio("edu 00:02.0 BAR 0", 0x98, b"\x01\0\0\0")) == "edu DMA_CMD 0x00000001"
