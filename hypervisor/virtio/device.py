"""What a virtio device (block, later others) gives its transport.

The transport owns registers, feature negotiation, queue setup and interrupts; a device only
describes itself (ID, features, config space, queue sizes) and consumes descriptor chains.
This is the split of rust-vmm's VirtioDevice trait and of virtio 1.2 §4 (transport) versus §5
(device types).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

from hypervisor.virtio.queue import Virtqueue

log = logging.getLogger(__name__)


class VirtioDevice(abc.ABC):
    """A device behind a virtio transport. Methods are called with the transport's locks held."""

    #: §5 Device Types: the DeviceID register value.
    device_id: int

    @property
    @abc.abstractmethod
    def queue_max_sizes(self) -> Sequence[int]:
        """One entry per virtqueue: the largest size the driver may choose (QueueNumMax)."""

    @abc.abstractmethod
    def device_features(self) -> int:
        """Device-type feature bits (§5.x.3); the transport adds the ring and version bits."""

    @abc.abstractmethod
    def config_bytes(self) -> bytes:
        """The current device-specific configuration space (§4.2.2: at offset 0x100)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote config space; read-only by default (blk has no writable fields
        unless VIRTIO_BLK_F_CONFIG_WCE, which is not offered)."""
        log.debug("%s: ignored config write of %d bytes at %#x", type(self).__name__, len(data), offset)

    def activate(self, driver_features: int) -> None:  # noqa: B027 - optional hook
        """DRIVER_OK was set with these negotiated features; queues follow."""

    @abc.abstractmethod
    def process_queue(self, index: int, queue: Virtqueue) -> None:
        """One pass: consume the chains available on `queue` now (`iter_available`) and put
        each on the used ring. The transport interrupts, re-arms and calls again while more
        arrive. Raises VirtqueueError when the driver broke the ring protocol."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The driver reset the device (status 0); forget negotiated state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release host resources (files) at machine shutdown."""
