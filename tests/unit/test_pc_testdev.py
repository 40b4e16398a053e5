import mmap

from hypervisor.devices.pc_testdev import FlushPage, HostPageFlusher, IoMemory, IrqLines, ScratchRegister
from hypervisor.memory import GuestMemory


def read(device: object, offset: int, size: int) -> bytes:
    data = bytearray(size)
    device.read(offset, memoryview(data))  # type: ignore[attr-defined]
    return bytes(data)


def test_scratch_register_keeps_bytes_at_their_offsets() -> None:
    register = ScratchRegister()
    register.write(0, (0x12345678).to_bytes(4, "little"))
    assert read(register, 0, 4) == bytes.fromhex("78563412")
    register.write(2, b"\xaa")  # a byte write replaces only its byte (pc-testdev.c ioport)
    assert int.from_bytes(read(register, 0, 4), "little") == 0x12AA5678
    assert read(register, 1, 2) == b"\x56\xaa"


def test_irq_ports_follow_each_written_byte() -> None:
    calls: list[tuple[int, bool]] = []
    lines = IrqLines(lambda line, level: calls.append((line, level)))
    lines.write(11, b"\x01")
    lines.write(11, b"\x00")
    assert calls == [(11, True), (11, False)]
    calls.clear()
    lines.write(11, (1).to_bytes(4, "little"))  # outl $1, $0x200b: line 11 high, 12-14 low
    assert calls == [(11, True), (12, False), (13, False), (14, False)]
    calls.clear()
    lines.write(23, b"\x01\x01")  # nothing beyond the 24 lines
    assert calls == [(23, True)]


def test_iomem_is_scratch_memory() -> None:
    window = IoMemory()
    window.write(0x100, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert read(window, 0x102, 4) == b"\x03\x04\x05\x06"
    assert read(window, 0xFFFC, 4) == bytes(4)


def test_flush_page_takes_32_bit_writes_and_the_page_address() -> None:
    flushed: list[int] = []
    port = FlushPage(flushed.append)
    port.write(0, (0x12345).to_bytes(4, "little"))
    port.write(0, b"\x01")  # not a 32-bit access: ignored as by QEMU
    assert flushed == [0x12000]


def test_host_page_flush_keeps_the_contents() -> None:
    memory = GuestMemory([(0, 4 * mmap.PAGESIZE)])
    try:
        memory.write(mmap.PAGESIZE + 8, b"kept")
        HostPageFlusher(memory)(mmap.PAGESIZE)
        HostPageFlusher(memory)(1 << 40)  # not RAM: ignored
        assert memory.read(mmap.PAGESIZE + 8, 4) == b"kept"
        memory.write(mmap.PAGESIZE, b"rw")  # still writable after the remap
    finally:
        memory.close()


def test_firmware_pic_vector_bases() -> None:
    import pytest

    from hypervisor.boot.firmware_pic import IRQ_BASE_OFFSET, with_vector_base
    from hypervisor.errors import HypervisorError

    state = bytes(8) + bytes([0, 0, 0xF8, 0, 0, 0]) + bytes(506)
    changed = with_vector_base(state, 0x70)
    assert changed[IRQ_BASE_OFFSET] == 0x70 and changed[10] == 0xF8 and len(changed) == len(state)
    with pytest.raises(ValueError):
        with_vector_base(state, 0x71)
    with pytest.raises(HypervisorError):
        with_vector_base(b"\0" * 8, 0x08)
