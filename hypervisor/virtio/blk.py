"""virtio-blk (virtio 1.2 §5.2): one request queue over a BlockBackend (raw file or qcow2).

The machine builds it as
    device = VirtioBlock(open_disk(path, ...), serial="disk0")
    transport = MmioTransport(device, memory, interrupt_line, name="vda")
and owns neither requests nor files afterwards: `transport.close()` closes the backend.
"""

from __future__ import annotations

import logging
import struct
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from hypervisor.block.backend import BlockBackend
from hypervisor.block.raw import RawFile
from hypervisor.errors import ConfigError
from hypervisor.kvm.virtio_c import MAX_REGIONS, BlkFastQueue, RamRegion
from hypervisor.virtio.blk_request import (
    ID_BYTES,
    SECTOR_SIZE,
    T_IN,
    T_OUT,
    BlockLimits,
    BlockRequest,
    RequestExecutor,
    parse_request,
)
from hypervisor.virtio.device import VirtioDevice
from hypervisor.virtio.iovec import total_length
from hypervisor.virtio.queue import DescriptorChain, Virtqueue
from hypervisor.virtio.spec import DeviceId, feature_bit

if TYPE_CHECKING:
    from hypervisor.block.qcow2 import Qcow2Image
    from hypervisor.virtio.blk_plain import PlainClusterCache


def _exactly_qcow2_image(backend: BlockBackend) -> Qcow2Image | None:
    """`backend` if its type is exactly Qcow2Image, else None. Only a run that opened a qcow2
    image has imported the engine, so a raw disk's start-up does not pay for importing it
    (construct and the engine: about 50 ms of imports, measured on a loaded host)."""
    package = sys.modules.get("hypervisor.block.qcow2")
    if package is None or type(backend) is not package.Qcow2Image:
        return None
    return cast("Qcow2Image", backend)

log = logging.getLogger(__name__)

# §5.2.3 Feature bits.
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_DISCARD = 13
F_WRITE_ZEROES = 14

QUEUE_SIZE = 256
BLOCK_STATE_VERSION = 1  # of VirtioBlock.state()
# Linux needs seg_max + 2 descriptors per request (header and status); with this the largest
# request still fits one queue, direct or indirect.
SEG_MAX = QUEUE_SIZE - 2
# Largest single segment the driver may hand us. Not enforced (every descriptor is checked
# against guest RAM anyway); it only shapes how Linux builds its scatter lists.
SIZE_MAX = 1 << 20
BLK_SIZE = SECTOR_SIZE
# Discard and write-zeroes limits (§5.2.4): 64 MiB a segment, 16 segments a request, so one
# request is at most 1 GiB; zeroing that on a block device (no fallocate) takes seconds, and a
# reset or machine stop waits for the request in hand. Aligned to 4 KiB pages.
MAX_DISCARD_SECTORS = (64 << 20) // SECTOR_SIZE
MAX_DISCARD_SEGMENTS = 16
DISCARD_SECTOR_ALIGNMENT = 4096 // SECTOR_SIZE
MAX_WRITE_ZEROES_SECTORS = MAX_DISCARD_SECTORS
MAX_WRITE_ZEROES_SEGMENTS = MAX_DISCARD_SEGMENTS

# §5.2.4 struct virtio_blk_config up to write_zeroes_may_unmap and its padding:
# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused0,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
CONFIG_LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG_LAYOUT.size == 60


def _serial_bytes(serial: str) -> bytes:
    """§5.2.6: the GET_ID string, NUL-padded to 20 bytes (no NUL when it is 20 long)."""
    if not serial.isascii() or not serial.isprintable() or len(serial) > ID_BYTES:
        raise ConfigError(f"disk serial {serial!r} must be at most {ID_BYTES} printable ASCII characters")
    return serial.encode("ascii").ljust(ID_BYTES, b"\0")


class VirtioBlock(VirtioDevice):
    """A virtio block device. Requests are validated against the disk, never trusted."""

    device_id = DeviceId.BLOCK

    def __init__(self, backend: BlockBackend, serial: str = "", name: str = "virtio-blk") -> None:
        self.backend = backend
        self.name = name
        self.serial = _serial_bytes(serial)
        if backend.size % SECTOR_SIZE:
            log.warning(
                "%s: disk size %d is not a multiple of %d; the last %d bytes are not visible",
                name,
                backend.size,
                SECTOR_SIZE,
                backend.size % SECTOR_SIZE,
            )
        self._driver_features = 0
        self._executor = RequestExecutor(backend, self._limits(), name)
        self._close_actions: list[Callable[[], None]] = []
        # The C path of the queue it was made for (weakly: a queue pins guest RAM with its views,
        # and the transport drops its queues so that memory can be unmapped), on that backend.
        self._fast: tuple[weakref.ref[Virtqueue], BlockBackend, bool, BlkFastQueue] | None = None
        # On a qcow2 image: the plain clusters C may do I/O at (blk_plain.py), for that backend.
        self._plain: PlainClusterCache | None = None
        self.fast_requests = 0  # requests the C path completed (the rest ran in Python)

    @property
    def capacity_sectors(self) -> int:
        return self.backend.size // SECTOR_SIZE

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return (QUEUE_SIZE,)

    def device_features(self) -> int:
        features = 0
        for bit in (F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES):
            features |= feature_bit(bit)
        if self.backend.read_only:
            features |= feature_bit(F_RO)
        return features

    def config_bytes(self) -> bytes:
        return CONFIG_LAYOUT.pack(
            self.capacity_sectors,
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # geometry: VIRTIO_BLK_F_GEOMETRY not offered
            BLK_SIZE,
            0,
            0,
            0,
            0,  # topology: VIRTIO_BLK_F_TOPOLOGY not offered
            0,  # writeback: VIRTIO_BLK_F_CONFIG_WCE not offered (we always write through)
            0,  # unused0
            0,  # num_queues: VIRTIO_BLK_F_MQ not offered
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEGMENTS,
            1,  # write_zeroes_may_unmap: the backend may free zeroed ranges
        )

    def _limits(self) -> BlockLimits:
        negotiated = self._driver_features
        return BlockLimits(
            capacity_sectors=self.capacity_sectors,
            read_only=self.backend.read_only,
            serial=self.serial,
            discard=bool(negotiated & feature_bit(F_DISCARD)),
            write_zeroes=bool(negotiated & feature_bit(F_WRITE_ZEROES)),
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_segments=MAX_DISCARD_SEGMENTS,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_segments=MAX_WRITE_ZEROES_SEGMENTS,
        )

    def activate(self, driver_features: int) -> None:
        self._driver_features = driver_features
        self._executor.limits = self._limits()

    def reset(self) -> None:
        self._fast = None
        self._driver_features = 0
        self._executor.limits = self._limits()

    # False to measure or test the Python path alone (benchmarks/virtio_blk.py, the tests).
    use_c_path = True

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        """Run every request available now, in order; the transport interrupts once after.

        On a raw file, and on the plainly mapped clusters of a qcow2 image, the C path
        (csrc/virtio_blk.c) completes the plain reads and writes and stops at the first chain it
        does not take; that one runs here with every check and error status, then C goes on. On
        qcow2 the image's lock is held around C (blk_plain.py says why), and what Python served
        teaches the cluster map. The loop is bounded so the I/O thread gets back to its stop
        requests however fast the guest refills the ring.
        """
        fast = self._fast_queue(queue)
        if fast is None:
            for chain in queue.iter_available():
                self._run(queue, chain)
            return
        plain = self._plain
        for _ in range(queue.size):
            if plain is not None:
                with plain.lock:
                    result = fast.process(queue.next_avail, queue.next_used)
            else:
                result = fast.process(queue.next_avail, queue.next_used)
            queue.advance(result.next_avail, result.next_used, result.completed)
            self.fast_requests += result.completed
            if result.caught_up:
                return
            declined = queue.take_available()
            if declined is None:
                return
            if plain is None:
                self._run(queue, declined)
                continue
            changes = plain.changes
            request = self._run(queue, declined)
            # A read or write that changed no mapping (a cold map, a backing file read) is worth
            # learning; one that allocated or copied would be forgotten at the next change anyway.
            if request.type in (T_IN, T_OUT) and plain.changes == changes:
                data = request.in_data if request.type == T_IN else request.out_data
                plain.learn(request.sector * SECTOR_SIZE, total_length(data))

    def _run(self, queue: Virtqueue, chain: DescriptorChain) -> BlockRequest:
        request = parse_request(chain)
        queue.add_used(chain.head, self._executor.execute(request))
        return request

    def _plain_cache(self, backend: Qcow2Image) -> PlainClusterCache | None:
        """The cluster map of `backend`, made on first use (kept across queue resets)."""
        plain = self._plain
        if plain is not None and plain.image is backend:
            return plain
        from hypervisor.virtio.blk_plain import PlainClusterCache

        self._drop_plain()
        self._plain = PlainClusterCache.for_image(backend)
        return self._plain

    def _drop_plain(self) -> None:
        if self._plain is not None:
            self._plain.close()
            self._plain = None

    def _fast_queue(self, queue: Virtqueue) -> BlkFastQueue | None:
        """The C path for `queue`, made on first use; None where only Python can serve."""
        backend, read_only = self.backend, self._executor.limits.read_only
        cached = self._fast
        if cached is not None and cached[0]() is queue and cached[1] is backend and cached[2] == read_only:
            return cached[3]
        self._fast = None
        regions = queue.memory.regions
        if not self.use_c_path or len(regions) > MAX_REGIONS:
            return None
        # A raw file is a plain fd to preadv/pwritev; a qcow2 image (exactly: no shim or overlay
        # around it, whose semantics C does not know) is one through its map of plain clusters.
        plain = None
        if type(backend) is RawFile:
            fd = backend.fd
        elif (image := _exactly_qcow2_image(backend)) is not None:
            plain = self._plain_cache(image)
            if plain is None:
                return None
            fd = plain.fd
        else:
            return None
        fast = BlkFastQueue(
            [RamRegion(region.gpa, region.size, region.host_address) for region in regions],
            queue.size,
            queue.desc_host,
            queue.avail_host,
            queue.used_host,
            fd,
            read_only,
            self._executor.limits.capacity_sectors,
            plain.map if plain is not None else None,
        )
        self._fast = (weakref.ref(queue), backend, read_only, fast)
        return fast

    @property
    def backend_errors(self) -> int:
        return self._executor.backend_errors

    # ---- state as data (snapshots) ----

    def state(self) -> dict[str, object]:
        """What the driver negotiated and what identifies the disk it saw (§5.2.4 config is
        derived from the backend, so capacity, serial and read-only are recorded to check
        that a restore gives the guest the same disk)."""
        fields = {"driver_features": self._driver_features, "capacity_sectors": self.capacity_sectors,
                  "serial": self.serial.hex(), "read_only": self.backend.read_only}  # fmt: skip
        return {"type": type(self).__name__, "version": BLOCK_STATE_VERSION, "fields": fields}

    def restore_state(self, state: object) -> None:
        """ConfigError (one line) when `state` is not a virtio-blk's or names another disk."""
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise ConfigError(f"{self.name}: saved device state is not a virtio-blk's")
        if state.get("version") != BLOCK_STATE_VERSION:
            raise ConfigError(f"{self.name}: saved virtio-blk state has version {state.get('version')!r}, "
                              f"pyhv reads {BLOCK_STATE_VERSION}")  # fmt: skip
        fields = state.get("fields")
        if not isinstance(fields, dict) or set(fields) != {"driver_features", "capacity_sectors", "serial",
                                                           "read_only"}:  # fmt: skip
            raise ConfigError(f"{self.name}: saved virtio-blk state does not have the fields of this version")
        features = fields["driver_features"]
        if not isinstance(features, int) or isinstance(features, bool) or not 0 <= features < 1 << 64:
            raise ConfigError(f"{self.name}: saved driver features {features!r} are not a 64-bit value")
        if fields["capacity_sectors"] != self.capacity_sectors:
            raise ConfigError(f"{self.name}: the saved disk had {fields['capacity_sectors']!r} sectors, "
                              f"this one has {self.capacity_sectors}")  # fmt: skip
        if fields["serial"] != self.serial.hex() or fields["read_only"] != self.backend.read_only:
            raise ConfigError(f"{self.name}: the saved disk had another serial or read-only mode")
        self.activate(features)

    def replace_backend(self, backend: BlockBackend) -> BlockBackend:
        """Continue on `backend` (a snapshot froze the old image under a new overlay) and return
        the old one, which the caller closes. Only while no request runs (I/O thread stopped);
        the new backend must show the guest the same disk."""
        if backend.size // SECTOR_SIZE != self.capacity_sectors or backend.read_only != self.backend.read_only:
            raise ConfigError(f"{self.name}: the replacement disk differs in size or read-only mode")
        old, self.backend = self.backend, backend
        self._executor.backend = backend
        self._fast = None
        self._drop_plain()
        return old

    def add_close_action(self, action: Callable[[], None]) -> None:
        """Runs `action` after the backend is closed (a restored run's overlay is removed)."""
        self._close_actions.append(action)

    def close(self) -> None:
        self._fast = None
        try:
            self._drop_plain()
            self.backend.close()
        finally:
            for action in self._close_actions:
                action()
            self._close_actions = []
