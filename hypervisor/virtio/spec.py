"""Numbers from the virtio 1.2 specification shared by the transport, the rings and the devices.

Device-specific numbers (virtio-blk's request types, its config layout) live with their device.
"""

from __future__ import annotations

import enum

# §2.1 Device Status Field: bits the driver sets as it brings the device up, plus the two
# the device or driver uses to give up on each other.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# §6 Reserved Feature Bits: the ones that concern the ring or the transport, not one device.
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32

# §2.7.5 The Virtqueue Descriptor Table: struct virtq_desc.flags.
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16  # le64 addr, le32 len, le16 flags, le16 next

# §2.7.6 The Virtqueue Available Ring: struct virtq_avail.flags.
AVAIL_F_NO_INTERRUPT = 1
# §2.7.8 The Virtqueue Used Ring: struct virtq_used.flags.
USED_F_NO_NOTIFY = 1
USED_ELEMENT_SIZE = 8  # le32 id, le32 len

# §2.7 Split Virtqueues: "The maximum Queue Size value is 32768".
MAX_QUEUE_SIZE = 32768

# §2.7.5.2 (driver requirements): "Drivers MUST NOT add a descriptor chain longer than 2^32
# bytes in total".
MAX_CHAIN_BYTES = 1 << 32

# §4.2.2.1: "interrupt status" bits of the MMIO InterruptStatus register.
INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2


class DeviceId(enum.IntEnum):
    """§5 Device Types: the DeviceID a transport reports."""

    NETWORK = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4


def feature_bit(bit: int) -> int:
    """The feature mask of bit number `bit` (features are numbered, §2.2)."""
    return 1 << bit


def status_text(status: int) -> str:
    """A device status as names, for logs ('ACKNOWLEDGE|DRIVER|FEATURES_OK')."""
    names = [
        (STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"),
        (STATUS_DRIVER, "DRIVER"),
        (STATUS_FEATURES_OK, "FEATURES_OK"),
        (STATUS_DRIVER_OK, "DRIVER_OK"),
        (STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"),
        (STATUS_FAILED, "FAILED"),
    ]
    parts = [name for mask, name in names if status & mask]
    unknown = status & ~sum(mask for mask, _ in names)
    if unknown:
        parts.append(f"{unknown:#x}")
    return "|".join(parts) or "RESET"
