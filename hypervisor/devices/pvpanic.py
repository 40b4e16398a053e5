"""QEMU's ISA pvpanic device: a guest kernel tells its host that it panicked.

QEMU docs/specs/pvpanic.rst, "ISA Interface": one I/O port, 0x505 by default. A read returns the
events the device recognises (pyhv: bit 0 PVPANIC_PANICKED and bit 1 PVPANIC_CRASH_LOADED, as
Linux include/uapi/misc/pvpanic.h numbers them); a guest ignores bits it does not know. On a
write the device ignores the bits it does not recognise. Bit 0, "a guest panic has happened and
should be processed by the host", ends the run with the panic outcome (status 121) from the
machine itself, so no console text has to be scraped. Bit 1, "a guest panic has happened and
will be handled by the guest" (Linux sends it instead of bit 0 when a kdump kernel is loaded),
is recorded and logged and the guest goes on, as QEMU lets its kdump kernel take over. A write
with both bits is a panic, as in QEMU's handler, which tests PANICKED first.

The guest finds the port in the DSDT: a `QEMU0001` device whose `_CRS` holds it
(hypervisor/boot/acpi.py), which Linux's pvpanic driver (drivers/misc/pvpanic/pvpanic-mmio.c)
binds to; that needs a kernel with CONFIG_ACPI and CONFIG_PVPANIC (docs/ci.md).

Snapshots: the device has no state beyond its configuration (the port is fixed, the event
bitmap a constant, the callbacks wired by the machine), so it is not a StatefulDevice, as the
debug-exit port is not; `crash_loaded_reports` is a count for this run's log and is not saved.
The panic report (`on_panic`) is an effect, performed after the device's bus lock is released
(hypervisor.devices.gate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hypervisor.devices.gate import GatedDevice
from hypervisor.outcome import PANIC_SOURCE_PVPANIC, Outcome, panic_outcome

log = logging.getLogger(__name__)

PVPANIC_PORT = 0x505  # QEMU's default `ioport` property (docs/specs/pvpanic.rst)
PVPANIC_PORT_SIZE = 1
PVPANIC_PANICKED = 1 << 0  # Linux include/uapi/misc/pvpanic.h
PVPANIC_CRASH_LOADED = 1 << 1
# What a read returns: the events this device handles. Bit 2 (PVPANIC_SHUTDOWN, newer QEMU) is
# not offered: a guest's shutdown already ends the run through ACPI S5 or the i8042.
PVPANIC_EVENTS = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED


def pvpanic_panic(written: int, port: int = PVPANIC_PORT) -> Outcome:
    """The outcome of a guest's PVPANIC_PANICKED write: a panic the machine saw, not the console."""
    return panic_outcome(
        f"the guest kernel reported a panic through pvpanic (wrote {written:#04x} to port {port:#x})",
        PANIC_SOURCE_PVPANIC,
        written=written,
        port=port,
    )


class PvPanic(GatedDevice):
    """The pvpanic port. `on_panic` gets the outcome to end the run with (Machine.request_stop)."""

    def __init__(self, on_panic: Callable[[Outcome], None], port: int = PVPANIC_PORT) -> None:
        self._on_panic = on_panic
        self.port = port  # for the outcome's detail only: a device never sees its base address
        self.crash_loaded_reports = 0
        self._unknown_bits_logged = False

    def read(self, offset: int, data: memoryview) -> None:
        # A wider read than the one-byte port gets the bitmap in its low byte, as an ISA
        # device answers the rest of the access with nothing (zeros).
        data[:] = bytes(len(data))
        data[0] = PVPANIC_EVENTS

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, data)

    def _write(self, data: bytes) -> None:
        value = data[0]  # only the port's own byte counts, whatever the access width
        unknown = value & ~PVPANIC_EVENTS
        if unknown and not self._unknown_bits_logged:
            # Ignored, as the spec asks; said once so a chatty guest cannot flood the log.
            self._unknown_bits_logged = True
            log.warning("the guest wrote pvpanic bits %#x that pyhv does not handle; ignored", unknown)
        if value & PVPANIC_PANICKED:
            log.debug("pvpanic: guest panicked (%#x)", value)
            self._post(self._on_panic, pvpanic_panic(value, self.port))
        elif value & PVPANIC_CRASH_LOADED:
            self.crash_loaded_reports += 1
            log.warning("the guest kernel reported a panic through pvpanic with a crash kernel loaded "
                        "(PVPANIC_CRASH_LOADED); the run goes on while the guest handles it")  # fmt: skip
