"""Flat binaries: `pyhv run --raw FILE@ADDR` copies FILE to guest physical ADDR and starts it in
real mode there (CS=0, IP=ADDR; see `real_mode_state` for addresses above 64 KiB).

Nothing else is written: a raw guest brings its own GDT, page tables and stack.
"""

from __future__ import annotations

import logging

from hypervisor.boot.cpu_state import real_mode_state
from hypervisor.boot.placement import BootImage, Placement
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

# Real mode addresses at most 1 MiB + 64 KiB through a selector; above that the entry relies on
# a hidden CS base, which KVM accepts but a guest reloading CS would lose. 4 GiB is the hard
# limit of a 32-bit segment base.
MAX_RAW_ENTRY = 0xFFFFFFFF


def load_raw(memory: GuestMemory, data: bytes, address: int, name: str = "the raw image") -> Placement:
    """Copy `data` to guest physical `address`; BootError when it does not fit in guest RAM."""
    if not data:
        raise BootError(f"{name} is empty")
    if address < 0 or not memory.contains(address, len(data)):
        raise BootError(
            f"{name} ({len(data)} bytes at {address:#x}) does not fit in the guest's "
            f"{memory.size // (1024 * 1024)} MiB of RAM"
        )
    memory.write(address, data)
    return Placement("raw image", address, len(data))


def prepare_raw(memory: GuestMemory, data: bytes, address: int, name: str = "the raw image") -> BootImage:
    """Load a flat binary and return a real-mode entry at its first byte."""
    if address > MAX_RAW_ENTRY:
        raise BootError(f"{name} cannot start in real mode at {address:#x} (above 4 GiB)")
    placement = load_raw(memory, data, address, name)
    log.info("raw image of %d bytes at %#x, real-mode entry", len(data), address)
    return BootImage(real_mode_state(address), "raw", [placement], source="raw binary")
