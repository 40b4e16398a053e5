"""virtio-blk's C path on a qcow2 image: the cache of plain clusters C reads and writes through.

The image says which guest clusters are plainly mapped (hypervisor/block/qcow2/plainmap.py: one
standard cluster of the image file, writable in place only with COPIED set); this keeps them in
C memory (a BlkClusterMap) for csrc/virtio_blk.c, which declines a request touching any other
cluster, so Python serves it with every qcow2 rule. After Python served a declined read or write,
`learn` puts the plain clusters of the window around it into the map, so the next request there
stays in C.

Consistency, under the image's one lock (Qcow2Image.lock):
- the image calls `_changed` before any L1 or L2 entry or the metadata set changes, and on
  close: a new generation, every entry stale at once;
- `learn` reads the mapping and fills the map under the lock, so nothing changes in between;
- the I/O thread holds the lock for the whole C call (VirtioBlock.process_queue), so no other
  thread (a snapshot's freeze, a tool holding the same image) can change the mapping while C
  does I/O at its offsets. Today every mutation in this process runs on that I/O thread or while
  it is stopped; the lock makes that a rule instead of an observation.
"""

from __future__ import annotations

import logging
import threading

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.plainmap import FILL_WINDOW, MAX_FILL_WINDOWS, WRITABLE
from hypervisor.errors import HypervisorError
from hypervisor.kvm.virtio_c import MAP_WRITABLE, BlkClusterMap

log = logging.getLogger(__name__)

# The image marks writable offsets with the bit C reads (the block layer cannot import C's name).
assert WRITABLE == MAP_WRITABLE


class PlainClusterCache:
    """The C path's map of one open qcow2 image (made by `for_image`, ended by `close`)."""

    def __init__(self, image: Qcow2Image, cluster_bits: int, fd: int) -> None:
        self.image = image
        self.fd = fd
        self.map = BlkClusterMap(cluster_bits)
        self._cluster_bits = cluster_bits
        self._learned: set[int] = set()  # windows looked at in this generation
        self._writable = False  # whether they were looked at with writable entries
        self.changes = 0  # mapping changes seen (a Python request that made one is not learned)
        self._unwatch = image.watch_mapping(self._changed)

    @classmethod
    def for_image(cls, image: Qcow2Image) -> PlainClusterCache | None:
        """A cache for `image`, or None when it has no plain clusters a cache may hold."""
        with image.lock:
            layout = image.plain_layout()
            if layout is None:
                return None
            return cls(image, layout.cluster_bits, layout.fd)

    @property
    def lock(self) -> threading.RLock:
        return self.image.lock

    def _changed(self) -> None:
        self.changes += 1
        self._learned.clear()
        self.map.clear()

    def learn(self, offset: int, length: int) -> None:
        """Fill the map around guest bytes [offset, offset+length), which Python just served."""
        cb = self._cluster_bits
        first_window, last_window = (offset >> cb) // FILL_WINDOW, ((offset + max(length, 1) - 1) >> cb) // FILL_WINDOW
        windows = range(first_window, last_window + 1)[:MAX_FILL_WINDOWS]
        with self.image.lock:
            layout = self.image.plain_layout()
            if layout is None or layout.fd != self.fd:
                self.map.set_limits(0, 0, enabled=False)
                return
            if layout.writable != self._writable:  # the first write prepared the image
                self._writable = layout.writable
                self._learned.clear()
            if all(window in self._learned for window in windows):
                return
            try:
                runs = self.image.plain_runs(offset, length)
            except (HypervisorError, OSError, ValueError) as error:  # Python's request said so already
                log.debug("%s: no plain clusters learned at %d: %s", self.image.path, offset, error)
                return
            for run in runs:
                self.map.fill(run.first, run.hosts)
            self._learned.update(windows)
            self.map.set_limits(layout.disk_size, layout.file_size, enabled=True)

    def close(self) -> None:
        """Stop hearing of the image's changes; C declines every request from now on."""
        with self.image.lock:
            self._unwatch()
            self.map.set_limits(0, 0, enabled=False)
            self.map.clear()
