import struct

import pytest

from hypervisor.devices.fw_cfg import (
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_ID,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FwCfg,
    e820_file,
)
from hypervisor.errors import ConfigError


def select(device: FwCfg, key: int) -> None:
    device.write(0, key.to_bytes(2, "little"))  # outw to the selector, as lib/x86/fwcfg.c does


def read_bytes(device: FwCfg, count: int) -> bytes:
    out = bytearray()
    for _ in range(count):
        data = bytearray(1)
        device.read(1, memoryview(data))
        out += data
    return bytes(out)


def read_item(device: FwCfg, key: int, count: int) -> bytes:
    select(device, key)
    return read_bytes(device, count)


def test_signature_and_traditional_interface_only() -> None:
    device = FwCfg(128 << 20, 2)
    assert read_item(device, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_item(device, FW_CFG_ID, 4), "little") == 1  # no DMA bit


def test_cpu_count_and_ram_size_little_endian() -> None:
    device = FwCfg(384 << 20, 3)
    assert int.from_bytes(read_item(device, FW_CFG_NB_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(device, FW_CFG_MAX_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(device, FW_CFG_RAM_SIZE, 8), "little") == 384 << 20


def test_reads_past_the_end_and_unknown_keys_give_zero() -> None:
    device = FwCfg(1 << 20, 1)
    assert read_item(device, FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(device, 0x11, 8) == bytes(8)  # kvm-unit-tests' FW_CFG_MAX_RAM: absent means 0


def test_selecting_again_restarts_the_item() -> None:
    device = FwCfg(1 << 20, 1)
    select(device, FW_CFG_SIGNATURE)
    assert read_bytes(device, 2) == b"QE"
    select(device, FW_CFG_SIGNATURE)
    assert read_bytes(device, 4) == b"QEMU"


def test_file_directory_is_big_endian_and_sorted() -> None:
    device = FwCfg(1 << 20, 1, [("etc/zz", b"12345"), ("etc/e820", e820_file([(0, 1 << 20, 1)]))])
    select(device, FW_CFG_FILE_DIR)
    (count,) = struct.unpack(">I", read_bytes(device, 4))
    assert count == 2
    entries = [struct.unpack(">IHH56s", read_bytes(device, 64)) for _ in range(count)]
    names = [entry[3].rstrip(b"\0") for entry in entries]
    assert names == [b"etc/e820", b"etc/zz"]
    size, key, _, _ = entries[1]
    assert (size, key) == (5, FW_CFG_FILE_FIRST)
    assert read_item(device, key, 5) == b"12345"
    e820_size, e820_key, _, _ = entries[0]
    assert struct.unpack("<QQI", read_item(device, e820_key, e820_size)) == (0, 1 << 20, 1)


def test_data_writes_and_wide_reads_change_nothing() -> None:
    device = FwCfg(1 << 20, 1)
    select(device, FW_CFG_SIGNATURE)
    device.write(1, b"\x00")  # data register writes are ignored (QEMU >= 2.4)
    wide = bytearray(4)
    device.read(1, memoryview(wide))
    assert wide == b"\xff" * 4  # not a valid access: reads like an unassigned port
    assert read_bytes(device, 4) == b"QEMU"  # the offset did not move


@pytest.mark.parametrize("name", ["", "x" * 56, "a\0b"])
def test_bad_file_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        FwCfg(1 << 20, 1, [(name, b"")])


def test_duplicate_file_and_bad_cpu_count() -> None:
    device = FwCfg(1 << 20, 1, [("a", b"")])
    with pytest.raises(ConfigError):
        device.add_file("a", b"")
    with pytest.raises(ConfigError):
        FwCfg(1 << 20, 0)
