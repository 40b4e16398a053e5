"""The I/O thread of a virtio device, woken by one eventfd per virtqueue.

The machine creates one worker per device, hands it to the device's transport
(MmioTransport.use_worker), starts it with the vCPUs and stops and joins it at teardown after
the vCPUs are joined and before guest memory is unmapped; the transport only hands it work.

The machine registers each eventfd as a KVM ioeventfd on the transport's QueueNotify register
(datamatch = queue index), so a guest notify wakes this thread without the vCPU leaving KVM and
the vCPU never waits for the disk. Without an ioeventfd (unit tests, or a machine that did not
register one) the transport writes the same eventfd itself when QueueNotify is written.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 5.0
# After a batch the thread keeps looking at the rings this long before it sleeps, because a
# guest that waits for each request submits the next one within microseconds while a thread
# wake-up costs tens to hundreds of them (the idea of QEMU's iothread poll-max-ns).
DEFAULT_POLL_SECONDS = 100e-6


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass  # another wake-up already consumed the count


class QueueWorker:
    """One thread per device that calls `handler(queue_index)` whenever a queue is notified."""

    def __init__(
        self,
        name: str,
        queue_count: int,
        handler: Callable[[int], None],
        has_work: Callable[[int], bool] | None = None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        set_notifications: Callable[[int, bool], bool] | None = None,
    ) -> None:
        """`has_work(q)` is a cheap lock-free check for new buffers, used to poll before
        sleeping; without it the thread only wakes on notifications. `set_notifications(q, on)`
        (MmioTransport.set_notifications) lets the thread ask the driver not to notify while it
        polls, and must return whether buffers are waiting when it turns them back on."""
        self.name = name
        self._handler = handler
        self._has_work = has_work
        self._set_notifications = set_notifications
        self.poll_seconds = poll_seconds if has_work is not None else 0.0
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self._queue_fds = [os.eventfd(0, flags) for _ in range(queue_count)]
        self._stop_fd = os.eventfd(0, flags)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Held by the handler for one pass of requests, and by a vCPU that changes what passes
        # work on (a device reset, a QueueReady write): it waits for the pass in flight.
        self.pass_lock = threading.Lock()

    def eventfd(self, queue_index: int) -> int:
        """The fd to register as the ioeventfd of `queue_index`."""
        return self._queue_fds[queue_index]

    def kick(self, queue_index: int) -> None:
        """What a QueueNotify write does when KVM did not swallow it as an ioeventfd."""
        if queue_index < len(self._queue_fds):  # nothing to wake once closed
            os.eventfd_write(self._queue_fds[queue_index], 1)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        if self._stop_fd < 0:
            raise RuntimeError(f"{self.name}: I/O thread started after close()")
        _drain(self._stop_fd)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"io-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Wake the thread, let it finish the batch in hand, and join it.

        This is also the drain before a snapshot: a batch always runs every chain it took from
        the available ring to the used ring, and the thread looks at the stop request only
        between batches, so once it has ended no request is half done. Chains the guest made
        available but the thread had not taken stay on the ring (their eventfd count stays
        too), for the next start. True when the thread has ended (or never ran).
        """
        thread = self._thread
        if thread is None:
            return True
        self._stopping = True  # ends a polling pass without waiting for its deadline
        os.eventfd_write(self._stop_fd, 1)
        thread.join(STOP_TIMEOUT_SECONDS)
        self._thread = None
        if thread.is_alive():
            log.error("%s: I/O thread did not stop within %.0f s", self.name, STOP_TIMEOUT_SECONDS)
            return False
        return True

    def close(self) -> None:
        if self._stop_fd < 0:
            return
        self.stop()
        for fd in [*self._queue_fds, self._stop_fd]:
            os.close(fd)
        self._queue_fds = []
        self._stop_fd = -1

    def _run(self) -> None:
        poller = select.poll()
        index_of = {fd: index for index, fd in enumerate(self._queue_fds)}
        for fd in [self._stop_fd, *self._queue_fds]:
            poller.register(fd, select.POLLIN)
        log.debug("%s: I/O thread started", self.name)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if self._stop_fd in ready:
                log.debug("%s: I/O thread stopping", self.name)
                return
            for fd in ready:
                # Drain before handling: a notify that lands during the handler re-arms the fd,
                # so no request is left waiting for a wake-up that already happened.
                _drain(fd)
                self._handle(index_of[fd])
            self._poll_briefly()

    def _handle(self, queue_index: int) -> None:
        try:
            self._handler(queue_index)
        except Exception:  # the thread must outlive any bug in one batch
            log.exception("%s: queue %d handler failed", self.name, queue_index)

    def _poll_briefly(self) -> None:
        """Look for new buffers for up to poll_seconds after the last work found.

        Meanwhile the driver is asked not to notify (each notify is a VM exit, tens of µs on
        some hosts), and asked again before the thread sleeps; buffers that arrived while it was
        not notifying are handled then and the polling goes on (virtio 1.2 §2.7.10).
        """
        if not self.poll_seconds or self._has_work is None:
            return
        queues = range(len(self._queue_fds))
        suppress = self._set_notifications
        waiting: list[int] = []  # queues found with buffers when notifications went back on
        suppressed = False
        try:
            while True:
                if suppress is not None:
                    for queue_index in queues:
                        suppress(queue_index, False)
                    suppressed = True
                for queue_index in waiting:
                    self._handle(queue_index)
                self._poll_until_quiet()
                if suppress is None or self._stopping:
                    return
                waiting = [queue_index for queue_index in queues if suppress(queue_index, True)]
                suppressed = False
                if not waiting:
                    return
        except Exception:  # the thread must outlive any bug; notifications end up on below
            log.exception("%s: polling failed", self.name)
        finally:
            if suppressed and suppress is not None:
                for queue_index in queues:
                    try:
                        if suppress(queue_index, True):
                            # Buffers the driver added without notifying, left for a stop or
                            # an error: counted on the eventfd as a notify would have been, so
                            # the next pass, or the next start() after a snapshot, takes them.
                            self.kick(queue_index)
                    except Exception:
                        log.exception("%s: could not turn queue %d's notifications back on", self.name, queue_index)

    def _poll_until_quiet(self) -> None:
        assert self._has_work is not None
        deadline = time.monotonic() + self.poll_seconds
        while time.monotonic() < deadline and not self._stopping:
            found = False
            for queue_index in range(len(self._queue_fds)):
                if self._has_work(queue_index):
                    self._handle(queue_index)
                    found = True
            if found:
                deadline = time.monotonic() + self.poll_seconds
            else:
                time.sleep(0)  # lets a vCPU thread take the GIL for its own exits
