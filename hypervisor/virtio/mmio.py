"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), as a bus Device of one 4 KiB window.

The machine picks the window's base and IRQ, announces them to Linux with
`virtio_mmio.device=4K@<base>:<irq>`, wires `interrupt` to an irqfd, creates the device's I/O
thread (a QueueWorker running `process_queue`, hypervisor.virtio.worker), hands it to the
transport with `use_worker()` and registers the worker's eventfd of queue q as a KVM ioeventfd
at base + QUEUE_NOTIFY_OFFSET (4 bytes, datamatch q). The machine starts, stops and joins that
thread; the transport only hands it work. The register layout itself is in mmio_registers.

Threads: a vCPU thread calls read()/write(); the I/O thread calls process_queue(). The registers
have no lock of their own: both run them under the transport's bus lock (hypervisor.devices.gate),
held only briefly, never across a request. Interrupts and kicks of the I/O thread are effects,
performed after that lock is released. A pass of requests runs under the worker's pass lock,
which a vCPU takes (before the bus lock) only for status and QueueReady writes, so a reset waits
for the requests in flight (the driver sees status 0 only once the device is quiet) while
register reads such as InterruptStatus never wait for the disk. Order: pass lock, bus lock.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from hypervisor.devices.bus import InterruptLine
from hypervisor.devices.gate import GatedDevice
from hypervisor.errors import ConfigError
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import mmio_registers as reg
from hypervisor.virtio import spec
from hypervisor.virtio.device import VirtioDevice
from hypervisor.virtio.queue import Virtqueue, VirtqueueError
from hypervisor.virtio.worker import QueueWorker

log = logging.getLogger(__name__)

# What the machine needs to place a transport: its window and the ioeventfd address in it.
WINDOW_SIZE = reg.WINDOW_SIZE
QUEUE_NOTIFY_OFFSET = reg.QUEUE_NOTIFY_OFFSET

# Bumped when the meaning of MmioTransport.state() changes.
TRANSPORT_STATE_VERSION = 1
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_REGISTER_FIELDS = ("driver_features", "status", "interrupt_status", "device_features_sel", "driver_features_sel",
                    "queue_sel", "config_generation")  # fmt: skip
_QUEUE_FIELDS = {"max_size": _U32, "size": _U32, "desc": _U64, "driver": _U64, "device": _U64}

# A guest can repeat a mistake in a loop; only this many of its warnings reach the log.
GUEST_WARNING_LIMIT = 10

# Features every device on this transport gets: the rings implement them (queue.py).
TRANSPORT_FEATURES = (
    spec.feature_bit(spec.F_VERSION_1)
    | spec.feature_bit(spec.F_RING_INDIRECT_DESC)
    | spec.feature_bit(spec.F_RING_EVENT_IDX)
)

_ADDRESS_REGISTERS = {
    reg.QUEUE_DESC_LOW_OFFSET: ("desc", 0),
    reg.QUEUE_DESC_HIGH_OFFSET: ("desc", 32),
    reg.QUEUE_DRIVER_LOW_OFFSET: ("driver", 0),
    reg.QUEUE_DRIVER_HIGH_OFFSET: ("driver", 32),
    reg.QUEUE_DEVICE_LOW_OFFSET: ("device", 0),
    reg.QUEUE_DEVICE_HIGH_OFFSET: ("device", 32),
}


@dataclass
class QueueConfig:
    """What the driver programmed for one queue (§4.2.3.2), and the live ring once running."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    ring: Virtqueue | None = None

    def __post_init__(self) -> None:
        self.size = self.max_size  # §4.2.2: QueueNum "default" is the maximum


class MmioTransport(GatedDevice):
    """Registers, status state machine and interrupts of one virtio-mmio device."""

    def __init__(
        self, device: VirtioDevice, memory: GuestMemory, interrupt: InterruptLine, name: str = "virtio-mmio"
    ) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.name = name
        self.device_features = device.device_features() | TRANSPORT_FEATURES
        self._queues = [QueueConfig(size) for size in device.queue_max_sizes]
        self._worker: QueueWorker | None = None
        self.config_generation = 0
        self._guest_warnings = 0
        self._kick_after_restore = False
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.interrupt_status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._queues = [QueueConfig(queue.max_size) for queue in self._queues]

    # ---- the I/O thread it is given, for the machine ----

    @property
    def queue_count(self) -> int:
        return len(self._queues)

    def use_worker(self, worker: QueueWorker) -> None:
        """Hands queue notifications to `worker` (made by the machine to call `process_queue`
        and `has_pending`), whose pass lock also keeps resets apart from requests in flight."""
        self._serialised(self._use_worker, worker)

    def _use_worker(self, worker: QueueWorker) -> None:
        self._worker = worker
        if self._kick_after_restore:
            self._kick_every_queue()

    def _kick_every_queue(self) -> None:
        # A notification the guest made just before a save was an eventfd count of the old
        # process, not part of the snapshot: look at every queue once, so requests it announced
        # are picked up (an empty queue costs one read of avail.idx). The counts wait in the
        # eventfds until the machine starts the worker.
        self._kick_after_restore = False
        assert self._worker is not None
        for index in range(len(self._queues)):
            self._post(self._worker.kick, index)

    def _pass_lock(self) -> AbstractContextManager[object]:
        worker = self._worker
        return worker.pass_lock if worker is not None else contextlib.nullcontext()

    # The snapshot's drain (hypervisor.snapshot.machine_state) stops and restarts the I/O
    # thread through the transport; the machine owns the thread otherwise.

    def stop(self) -> bool:
        """Stops the worker after the batch in hand (QueueWorker.stop); True without one."""
        return self._worker.stop() if self._worker is not None else True

    def start(self) -> None:
        if self._worker is not None:
            self._worker.start()

    @property
    def io_running(self) -> bool:
        return self._worker is not None and self._worker.running

    def close(self) -> None:
        """Drops every view of guest RAM (GuestMemory.close() refuses while views exist) and
        closes the device's backend. The machine has stopped the worker first."""
        with self._pass_lock():
            self._serialised(self._drop_rings)
        self.device.close()

    def _drop_rings(self) -> None:
        for queue in self._queues:
            queue.ring = None

    # ---- state as data (snapshots; hypervisor/devices/state.py's shape) ----

    def state(self) -> dict[str, object]:
        """Registers, negotiated features, status, per-queue configuration and ring positions,
        and the device's own state. Take it with the vCPUs paused and the I/O thread stopped
        (`stop()`), so no request is half done and no register changes meanwhile."""
        device_state = getattr(self.device, "state", None)
        if device_state is None:
            raise ConfigError(f"{self.name}: a {type(self.device).__name__} cannot be saved")
        with self._pass_lock():
            return self._serialised(self._state, device_state)

    def _state(self, device_state: Any) -> dict[str, object]:
        queues = [
            {"max_size": queue.max_size, "size": queue.size, "ready": queue.ready, "desc": queue.desc,
             "driver": queue.driver, "device": queue.device,
             "ring": queue.ring.ring_state() if queue.ring is not None else None}
            for queue in self._queues
        ]  # fmt: skip
        fields = {
            "device_features": self.device_features, "driver_features": self.driver_features,
            "status": self.status, "interrupt_status": self.interrupt_status,
            "device_features_sel": self._device_features_sel, "driver_features_sel": self._driver_features_sel,
            "queue_sel": self._queue_sel, "config_generation": self.config_generation, "queues": queues,
            "device": device_state(),
        }  # fmt: skip
        return {"type": type(self).__name__, "version": TRANSPORT_STATE_VERSION, "fields": fields}

    def restore_state(self, state: object) -> None:
        """Sets the transport (before `start()`) from `state()`; ConfigError (one line) when the
        state is not this transport's, and the transport is then left as it was."""
        fields = _transport_fields(state, self.name)
        if fields["device_features"] != self.device_features:
            raise ConfigError(f"{self.name}: saved device features {fields['device_features']:#x} are not this "
                              f"device's {self.device_features:#x} (another pyhv version or disk mode)")  # fmt: skip
        saved_queues = fields["queues"]
        if [queue["max_size"] for queue in saved_queues] != [queue.max_size for queue in self._queues]:
            raise ConfigError(f"{self.name}: the saved queues are not this device's")
        with self._pass_lock():
            self._serialised(self._restore, fields)

    def _restore(self, fields: dict[str, Any]) -> None:
        saved_queues = fields["queues"]
        running = fields["status"] & spec.STATUS_DRIVER_OK and not fields["status"] & (
            spec.STATUS_DEVICE_NEEDS_RESET | spec.STATUS_FAILED
        )
        old_features = self.driver_features
        self.driver_features = fields["driver_features"]  # the rings are built with them
        queues: list[QueueConfig] = []
        failure: str | None = None
        try:
            for index, saved in enumerate(saved_queues):
                queue = QueueConfig(saved["max_size"])
                queues.append(queue)
                queue.size, queue.ready = saved["size"], saved["ready"]
                queue.desc, queue.driver, queue.device = saved["desc"], saved["driver"], saved["device"]
                if saved["ring"] is not None:
                    if not (running and queue.ready):
                        raise VirtqueueError(f"queue {index} has ring positions but is not running")
                    queue.ring = self._make_ring(queue)
                    queue.ring.restore_ring_state(saved["ring"])
            restore_device = getattr(self.device, "restore_state", None)
            if restore_device is None:
                raise ConfigError(f"{self.name}: a {type(self.device).__name__} cannot be restored")
            restore_device(fields["device"])
        except (VirtqueueError, ConfigError) as error:
            failure = f"{self.name}: saved queue state is damaged: {error}" if isinstance(
                error, VirtqueueError) else str(error)  # fmt: skip
        if failure is not None:
            # Raised outside the handler: the error's traceback would hold the refused
            # rings' frames, and with them views of guest RAM.
            self.driver_features = old_features
            for queue in queues:
                if queue.ring is not None:
                    queue.ring.release()
            raise ConfigError(failure)
        self._queues = queues
        self.status = fields["status"]
        self.interrupt_status = fields["interrupt_status"]
        self._device_features_sel = fields["device_features_sel"]
        self._driver_features_sel = fields["driver_features_sel"]
        self._queue_sel = fields["queue_sel"]
        self.config_generation = fields["config_generation"]
        self._kick_after_restore = True
        if self._worker is not None:
            self._kick_every_queue()

    # ---- the Device protocol (vCPU thread) ----

    def read(self, offset: int, data: memoryview) -> None:
        if offset >= reg.CONFIG_OFFSET:
            self._access(self._read_config, offset - reg.CONFIG_OFFSET, data)
            return
        if len(data) != 4 or offset % 4:
            # §4.2.2.2: register accesses are 32 bits wide and aligned; anything else is answered.
            log.debug("%s: %d-byte read at %#x is not a register access", self.name, len(data), offset)
            data[:] = bytes(len(data))
            return
        data[:] = self._access(self._read_register, offset).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset >= reg.CONFIG_OFFSET:
            self._access(self.device.write_config, offset - reg.CONFIG_OFFSET, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            log.debug("%s: %d-byte write at %#x is not a register access", self.name, len(data), offset)
            return
        value = int.from_bytes(data, "little")
        if offset in (reg.STATUS_OFFSET, reg.QUEUE_READY_OFFSET):
            with self._pass_lock():  # wait for requests in flight (module docstring)
                self._access(self._write_register, offset, value)
        else:
            self._access(self._write_register, offset, value)

    def _read_config(self, offset: int, data: memoryview) -> None:
        config = self.device.config_bytes()
        chunk = config[offset : offset + len(data)]
        data[:] = chunk + bytes(len(data) - len(chunk))

    def _selected_queue(self) -> QueueConfig | None:
        if self._queue_sel < len(self._queues):
            return self._queues[self._queue_sel]
        return None

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == reg.MAGIC_VALUE_OFFSET:
            return reg.MAGIC_VALUE
        if offset == reg.VERSION_OFFSET:
            return reg.VERSION
        if offset == reg.DEVICE_ID_OFFSET:
            return self.device.device_id
        if offset == reg.VENDOR_ID_OFFSET:
            return reg.VENDOR_ID
        if offset == reg.DEVICE_FEATURES_OFFSET:
            if self._device_features_sel > 1:
                return 0
            return (self.device_features >> (32 * self._device_features_sel)) & 0xFFFFFFFF
        if offset == reg.QUEUE_NUM_MAX_OFFSET:
            return queue.max_size if queue else 0  # 0: "queue not available" (§4.2.3.2)
        if offset == reg.QUEUE_READY_OFFSET:
            return int(queue.ready) if queue else 0
        if offset == reg.INTERRUPT_STATUS_OFFSET:
            return self.interrupt_status
        if offset == reg.STATUS_OFFSET:
            return self.status
        if offset == reg.CONFIG_GENERATION_OFFSET:
            return self.config_generation
        if reg.SHM_LEN_LOW_OFFSET <= offset <= reg.SHM_BASE_HIGH_OFFSET:
            return reg.NO_SHM_REGION
        log.debug("%s: read of write-only or unknown register %#x", self.name, offset)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if offset == reg.QUEUE_NOTIFY_OFFSET:
            self._notify(value)
        elif offset == reg.STATUS_OFFSET:
            self._write_status(value)
        elif offset == reg.QUEUE_READY_OFFSET:
            self._write_queue_ready(value)
        elif offset == reg.DEVICE_FEATURES_SEL_OFFSET:
            self._device_features_sel = value
        elif offset == reg.DRIVER_FEATURES_SEL_OFFSET:
            self._driver_features_sel = value
        elif offset == reg.DRIVER_FEATURES_OFFSET:
            self._write_driver_features(value)
        elif offset == reg.QUEUE_SEL_OFFSET:
            self._queue_sel = value
        elif offset == reg.INTERRUPT_ACK_OFFSET:
            self.interrupt_status &= ~value
        elif offset == reg.QUEUE_NUM_OFFSET or offset in _ADDRESS_REGISTERS:
            if queue is None or queue.ready:
                # §4.2.3.2: the queue is configured only while QueueReady reads 0.
                log.debug("%s: write %#x to %#x ignored: no queue or queue running", self.name, value, offset)
            elif offset == reg.QUEUE_NUM_OFFSET:
                queue.size = value
            else:
                which, shift = _ADDRESS_REGISTERS[offset]
                old = getattr(queue, which)
                setattr(queue, which, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        else:
            log.debug("%s: write %#x to read-only or unknown register %#x", self.name, value, offset)

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1: features are written between DRIVER and FEATURES_OK; later writes are ignored.
        if self.status & spec.STATUS_FEATURES_OK or not self.status & spec.STATUS_DRIVER:
            log.debug("%s: DriverFeatures write outside negotiation ignored", self.name)
            return
        if self._driver_features_sel > 1:
            return
        shift = 32 * self._driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _notify(self, value: int) -> None:
        queue_index = value & 0xFFFF  # without VIRTIO_F_NOTIFICATION_DATA only the index
        if queue_index >= len(self._queues):
            log.debug("%s: notify for nonexistent queue %d", self.name, queue_index)
        elif self._worker is not None:
            # Only when KVM did not take the write as an ioeventfd (no machine, or none
            # registered): wake the I/O thread the same way, after the lock is released.
            self._post(self._worker.kick, queue_index)
        else:
            log.debug("%s: notify for nonexistent queue %d", self.name, queue_index)

    # ---- status state machine (§2.1, §3.1.1) ----

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self.status
        if old & ~value & ~spec.STATUS_DEVICE_NEEDS_RESET:
            # Bits are only ever added; clearing them takes a reset (§2.1.1).
            log.debug(
                "%s: status %s -> %s clears bits, ignored",
                self.name,
                spec.status_text(old),
                spec.status_text(value),
            )
            return
        added = value & ~old & ~spec.STATUS_DEVICE_NEEDS_RESET
        new = old
        if added & spec.STATUS_FAILED:
            log.info("%s: the driver gave up on the device (FAILED)", self.name)
            new |= spec.STATUS_FAILED
        if added & spec.STATUS_ACKNOWLEDGE:
            new |= spec.STATUS_ACKNOWLEDGE
        if added & spec.STATUS_DRIVER and new & spec.STATUS_ACKNOWLEDGE:
            new |= spec.STATUS_DRIVER
        if added & spec.STATUS_FEATURES_OK and new & spec.STATUS_DRIVER and self._features_acceptable():
            new |= spec.STATUS_FEATURES_OK
        if added & spec.STATUS_DRIVER_OK and new & spec.STATUS_FEATURES_OK:
            new |= spec.STATUS_DRIVER_OK
        if new != old | added:
            log.debug("%s: status %s refused, now %s", self.name, spec.status_text(value), spec.status_text(new))
        self.status = new
        if new & spec.STATUS_DRIVER_OK and not old & spec.STATUS_DRIVER_OK:
            log.info("%s: driver ready, features %#x", self.name, self.driver_features)
            self.device.activate(self.driver_features)
            for index in range(len(self._queues)):
                self._start_ring(index)

    def _features_acceptable(self) -> bool:
        """§2.2.1: FEATURES_OK sticks only for a subset of what was offered, incl. VERSION_1."""
        unoffered = self.driver_features & ~self.device_features
        if unoffered:
            self._guest_warning(f"driver accepted features {unoffered:#x} that were not offered")
            return False
        if not self.driver_features & spec.feature_bit(spec.F_VERSION_1):
            self._guest_warning("driver did not accept VIRTIO_F_VERSION_1 (no legacy drivers)")
            return False
        return True

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            return
        if value & 1 and not queue.ready:
            queue.ready = True
            if self.status & spec.STATUS_DRIVER_OK:
                self._start_ring(self._queue_sel)
        elif not value & 1:
            queue.ready = False
            queue.ring = None

    def _start_ring(self, index: int) -> None:
        """Turn the programmed addresses of a ready queue into a Virtqueue over guest RAM."""
        queue = self._queues[index]
        if not queue.ready or queue.ring is not None:
            return
        if queue.size > queue.max_size:
            self._needs_reset(f"queue {index} size {queue.size} exceeds QueueNumMax {queue.max_size}")
            return
        try:
            queue.ring = self._make_ring(queue)
        except VirtqueueError as error:
            self._needs_reset(f"queue {index}: {error}")

    def _make_ring(self, queue: QueueConfig) -> Virtqueue:
        return Virtqueue(
            self.memory,
            queue.size,
            queue.desc,
            queue.driver,
            queue.device,
            event_idx=bool(self.driver_features & spec.feature_bit(spec.F_RING_EVENT_IDX)),
            indirect=bool(self.driver_features & spec.feature_bit(spec.F_RING_INDIRECT_DESC)),
        )

    def _reset(self) -> None:
        """§4.2.2.1: writing 0 to Status resets the device and every queue."""
        log.debug("%s: reset", self.name)
        self.device.reset()
        self._reset_registers()

    def _needs_reset(self, reason: str) -> None:
        """§2.1.2: tell the driver the device is broken, with a configuration change interrupt."""
        self._guest_warning(f"device needs reset: {reason}")
        self.status |= spec.STATUS_DEVICE_NEEDS_RESET
        for queue in self._queues:
            queue.ring = None
        self._raise_interrupt(spec.INTERRUPT_CONFIG_CHANGE)

    def _guest_warning(self, message: str) -> None:
        """A warning caused by the guest, limited so a looping guest cannot flood the log."""
        self._guest_warnings += 1
        if self._guest_warnings <= GUEST_WARNING_LIMIT:
            suffix = (
                " (further guest errors logged at debug level)" if self._guest_warnings == GUEST_WARNING_LIMIT else ""
            )
            log.warning("%s: %s%s", self.name, message, suffix)
        else:
            log.debug("%s: %s", self.name, message)

    def _raise_interrupt(self, reason: int) -> None:
        self.interrupt_status |= reason
        self._post(self.interrupt.pulse)  # after the lock: InterruptStatus already says why

    def config_changed(self) -> None:
        """The device changed its config space (e.g. resize): new generation and interrupt."""
        self._serialised(self._config_changed)

    def _config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & spec.STATUS_DRIVER_OK:
            self._raise_interrupt(spec.INTERRUPT_CONFIG_CHANGE)

    # ---- the I/O thread ----

    def has_pending(self, index: int) -> bool:
        """Whether queue `index` has buffers not yet taken; lock-free, for the I/O thread's
        polling (a stale answer only costs one empty or one delayed pass)."""
        ring = self._queues[index].ring if index < len(self._queues) else None
        return ring is not None and ring.has_available()

    def set_notifications(self, index: int, enabled: bool) -> bool:
        """Turn the driver's notifications of queue `index` on or off (Virtqueue.set_notifications)
        while the I/O thread polls it; True when buffers are waiting. Under the pass lock, on the
        live ring only: a ring a vCPU has just reset or replaced must not be written to, its
        memory may be the driver's again."""
        with self._pass_lock():
            ring = self._serialised(self._live_ring, index)
            return ring is not None and ring.set_notifications(enabled)

    def process_queue(self, index: int) -> None:
        """Run the requests of queue `index` in passes, one interrupt per pass if the driver
        wants it, until a pass finds nothing new. Called by the I/O thread; public so tests can
        drive it synchronously. The requests run outside the bus lock, under the worker's pass
        lock, which is released between passes so a reset or QueueReady write from a vCPU waits
        for one pass at most."""
        while True:
            with self._pass_lock():
                ring = self._serialised(self._live_ring, index)
                if ring is None:
                    return
                try:
                    self.device.process_queue(index, ring)
                except VirtqueueError as error:
                    self._serialised(self._needs_reset, f"queue {index}: {error}")
                    return
                except Exception as error:  # a device bug must not take the I/O thread down
                    log.exception("%s: queue %d failed", self.name, index)
                    self._serialised(self._needs_reset, f"queue {index}: internal error {error!r}")
                    return
                self._serialised(self._signal_used, ring)
                if not ring.rearm():
                    return

    def _signal_used(self, ring: Virtqueue) -> None:
        if ring.needs_interrupt():
            self._raise_interrupt(spec.INTERRUPT_USED_BUFFER)

    def _live_ring(self, index: int) -> Virtqueue | None:
        """The running ring of queue `index`, or None while the device may not process it."""
        if not self.status & spec.STATUS_DRIVER_OK:
            return None
        if self.status & (spec.STATUS_DEVICE_NEEDS_RESET | spec.STATUS_FAILED):
            return None
        return self._queues[index].ring if index < len(self._queues) else None


def _is_int(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _transport_fields(state: object, name: str) -> dict[str, Any]:
    """The fields of a saved MmioTransport state, every value checked (a snapshot file is
    untrusted input); ConfigError names the first bad one."""
    if not isinstance(state, dict) or state.get("type") != "MmioTransport":
        raise ConfigError(f"{name}: saved device state is not a virtio-mmio transport's")
    if state.get("version") != TRANSPORT_STATE_VERSION:
        raise ConfigError(f"{name}: saved transport state has version {state.get('version')!r}, "
                          f"pyhv reads {TRANSPORT_STATE_VERSION}")  # fmt: skip
    fields = state.get("fields")
    expected = {"device_features", *_REGISTER_FIELDS, "queues", "device"}
    if not isinstance(fields, dict) or set(fields) != expected:
        raise ConfigError(f"{name}: saved transport state does not have the fields of this version")
    if not _is_int(fields["device_features"], _U64) or not _is_int(fields["driver_features"], _U64):
        raise ConfigError(f"{name}: saved features are not 64-bit values")
    for key in _REGISTER_FIELDS[1:]:
        if not _is_int(fields[key], _U32):
            raise ConfigError(f"{name}: saved register {key}={fields[key]!r} is not a 32-bit value")
    queues = fields["queues"]
    if not isinstance(queues, list):
        raise ConfigError(f"{name}: saved queues are not a list")
    for index, queue in enumerate(queues):
        if not isinstance(queue, dict) or set(queue) != {*_QUEUE_FIELDS, "ready", "ring"}:
            raise ConfigError(f"{name}: saved queue {index} does not have the fields of this version")
        for key, limit in _QUEUE_FIELDS.items():
            if not _is_int(queue[key], limit):
                raise ConfigError(f"{name}: saved queue {index} {key}={queue[key]!r} is out of range")
        if not isinstance(queue["ready"], bool):
            raise ConfigError(f"{name}: saved queue {index} ready={queue['ready']!r} is not a bool")
    return fields
