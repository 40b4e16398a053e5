"""QEMU's firmware configuration device (fw_cfg), traditional I/O-port interface.

QEMU docs/specs/fw_cfg.rst: a guest writes a 16-bit item key to the selector register (port
0x510 on x86, "Selector Register"), which also resets the item's read offset, then reads the
item's bytes one at a time from the data register (port 0x511, "Data Register"); reads past the
end of an item, and reads of a key with no item, return 0. Writes to the data register are
ignored (QEMU 2.4 and later; writable items go through DMA only). Numeric items are
little-endian; the file directory (key 0x19, "File Directory") is big-endian.

kvm-unit-tests (lib/x86/fwcfg.c) learns its CPU count (FW_CFG_NB_CPUS) and RAM size
(FW_CFG_RAM_SIZE) here; firmware and boot loaders written for QEMU do the same. pyhv offers the
traditional interface only: bit 1 of FW_CFG_ID (DMA) is clear, so guests do not try the DMA
registers at 0x514 ("Feature Bitmap").
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

from hypervisor.devices.state import StatefulDevice
from hypervisor.errors import ConfigError

log = logging.getLogger(__name__)

FW_CFG_PORT = 0x510  # x86 I/O base: selector at +0 (16 bit), data at +1 (8 bit)
FW_CFG_PORT_COUNT = 2
SELECTOR_OFFSET = 0
DATA_OFFSET = 1

# Well-known keys (fw_cfg.rst "Selector Register"; Linux include/uapi/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20  # file items get keys from here on
FW_CFG_ARCH_LOCAL = 0x8000
# x86's arch-local key: 1 when ISA IRQ 0 reaches IOAPIC pin 2 (QEMU hw/i386/fw_cfg.h). pyhv
# keeps KVM's default GSI routing (GSI n -> pin n), so it says 0, as its MADT and MP table do.
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
# Bit 14 selects the write channel and bit 15 the architecture-local keys; the remaining bits
# are the item number (FW_CFG_ENTRY_MASK).
FW_CFG_WRITE_CHANNEL = 0x4000

SIGNATURE = b"QEMU"
FEATURE_TRADITIONAL = 1 << 0  # FW_CFG_ID bit 0: the I/O-port interface
FEATURE_DMA = 1 << 1  # bit 1: the DMA interface, which pyhv does not offer
MAX_FILE_NAME = 56  # FWCfgFile.name, NUL included
MAX_FILES = FW_CFG_ARCH_LOCAL - FW_CFG_WRITE_CHANNEL - FW_CFG_FILE_FIRST  # keys below the write bit
FILE_ENTRY_FORMAT = ">IHH56s"  # struct FWCfgFile: size, select, reserved, name (big-endian)


def _le(value: int, width: int) -> bytes:
    return value.to_bytes(width, "little")


class FwCfg(StatefulDevice):
    """The fw_cfg items of one machine and the guest's current selection.

    The device's bus lock (hypervisor.devices.gate) serialises the selector and the read offset:
    vCPUs share one device, and a guest that does not lock (kvm-unit-tests does) at least never
    sees a torn item.
    """

    # The items are the machine's configuration, rebuilt by the machine; only the read
    # position is state (a guest may be in the middle of reading an item).
    STATE_FIELDS = ("_selected", "_offset")

    def __init__(self, ram_size: int, cpus: int, files: Iterable[tuple[str, bytes]] = ()) -> None:
        if ram_size < 0 or not 1 <= cpus <= 0xFFFF:
            raise ConfigError(f"fw_cfg cannot describe {cpus} CPUs and {ram_size} bytes of RAM")
        self._items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: SIGNATURE,
            FW_CFG_ID: _le(FEATURE_TRADITIONAL, 4),
            FW_CFG_UUID: bytes(16),  # QEMU's default when -uuid is not given
            FW_CFG_RAM_SIZE: _le(ram_size, 8),
            FW_CFG_NOGRAPHIC: _le(1, 2),  # there is no display
            FW_CFG_NB_CPUS: _le(cpus, 2),
            FW_CFG_MAX_CPUS: _le(cpus, 2),  # no CPU hotplug: the most there will ever be
            FW_CFG_BOOT_MENU: _le(0, 2),
            FW_CFG_IRQ0_OVERRIDE: _le(0, 4),
        }
        self._files: list[tuple[str, int, int]] = []  # (name, key, size)
        for name, data in files:
            self.add_file(name, data)
        self._rebuild_directory()
        self._selected = FW_CFG_SIGNATURE
        self._offset = 0

    def add_file(self, name: str, data: bytes) -> int:
        """Offers `data` under `name` (e.g. "etc/e820"); returns its key."""
        encoded = name.encode()
        if not encoded or len(encoded) >= MAX_FILE_NAME or b"\0" in encoded:
            raise ConfigError(f"fw_cfg file name {name!r} must be 1 to {MAX_FILE_NAME - 1} bytes")
        if any(existing == name for existing, _, _ in self._files):
            raise ConfigError(f"fw_cfg already has a file named {name!r}")
        if len(self._files) >= MAX_FILES:
            raise ConfigError(f"fw_cfg holds at most {MAX_FILES} files")
        key = FW_CFG_FILE_FIRST + len(self._files)
        self._items[key] = bytes(data)
        self._files.append((name, key, len(data)))
        self._rebuild_directory()
        return key

    def _rebuild_directory(self) -> None:
        # fw_cfg.rst "File Directory": a big-endian count, then entries sorted by name (QEMU
        # keeps them sorted, and guests such as SeaBIOS rely on nothing else).
        entries = sorted(self._files)
        directory = struct.pack(">I", len(entries)) + b"".join(
            struct.pack(FILE_ENTRY_FORMAT, size, key, 0, name.encode()) for name, key, size in entries
        )
        self._items[FW_CFG_FILE_DIR] = directory

    def item(self, key: int) -> bytes:
        """The bytes a guest reads after selecting `key` (empty when there is no such item)."""
        return self._items.get(key & ~FW_CFG_WRITE_CHANNEL, b"")

    # -- the bus device ------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        # QEMU's combined port accepts byte reads only ("Data Register": 8 bits wide on x86); a
        # wider read is answered like an unassigned port so a confused guest sees no data.
        if len(data) != 1:
            data[:] = b"\xff" * len(data)
            return
        data[0] = self._access(self._next_byte)

    def _next_byte(self) -> int:
        item = self.item(self._selected)
        if self._offset >= len(item):
            return 0
        self._offset += 1
        return item[self._offset - 1]

    def write(self, offset: int, data: bytes) -> None:
        if offset == SELECTOR_OFFSET and len(data) == 2:
            key = int.from_bytes(data, "little")
            self._access(self._select, key)
            log.debug("fw_cfg: guest selected key %#x", key)
        # Byte writes (the data register) and other widths are ignored, as in QEMU >= 2.4.

    def _select(self, key: int) -> None:
        self._selected = key
        self._offset = 0


def e820_file(regions: Iterable[tuple[int, int, int]]) -> bytes:
    """QEMU's "etc/e820" file: packed little-endian {u64 address, u64 length, u32 type} entries
    (hw/i386/e820_memory_layout.h), for firmware that wants the memory map from fw_cfg."""
    return b"".join(struct.pack("<QQI", address, size, kind) for address, size, kind in regions)
