"""State as data for virtio (snapshots): the mmio transport with its queues and ring positions,
the virtqueue and virtio-blk round-trip through JSON; a damaged state is one ConfigError line and
leaves the device as it was; the I/O thread's stop is a drain."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest

from hypervisor.block.raw import RawFile
from hypervisor.devices.bus import NullInterruptLine
from hypervisor.errors import ConfigError
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import mmio, spec
from hypervisor.virtio import mmio_registers as regs
from hypervisor.virtio.blk import VirtioBlock
from hypervisor.virtio.blk_request import S_OK, T_GET_ID
from hypervisor.virtio.queue import Virtqueue, VirtqueueError
from hypervisor.virtio.worker import QueueWorker
from tests.virtio_driver import Allocator, BlockDriver, DriverQueue, MmioDriver

MEMORY_SIZE = 1 << 20


@pytest.fixture
def memory():
    ram = GuestMemory.flat(MEMORY_SIZE)
    yield ram
    ram.close()


def make_transport(tmp_path, memory, serial="S1", read_only=False, size=64 * 1024) -> mmio.MmioTransport:
    image = tmp_path / "disk.raw"
    if not image.exists():
        image.write_bytes(bytes(size))
    device = VirtioBlock(RawFile(str(image), read_only=read_only), serial=serial, name="vda")
    return mmio.MmioTransport(device, memory, NullInterruptLine(), name="vda")


def running_device(transport, memory, features=None):
    driver = MmioDriver(transport)
    allocator = Allocator(0x1000, MEMORY_SIZE)
    assert driver.negotiate(features)
    queue = DriverQueue(memory, allocator, 16)
    driver.setup_queue(0, queue)
    driver.driver_ok()
    return driver, BlockDriver(memory, allocator, queue)


def saved_mid_run(tmp_path, memory, features=None):
    """A transport that completed three requests and has a fourth published, not yet taken;
    its JSON state, and the pending request. The transport is closed (its disk released)."""
    transport = make_transport(tmp_path, memory)
    _, block = running_device(transport, memory, features)
    for _ in range(3):
        block.submit(T_GET_ID, in_length=20)
    transport.process_queue(0)
    pending = block.submit(T_GET_ID, in_length=20)
    state = json.loads(json.dumps(transport.state()))
    transport.close()
    return state, block, pending


def test_transport_state_round_trips_and_the_restored_device_takes_the_pending_request(tmp_path, memory) -> None:
    state, block, pending = saved_mid_run(tmp_path, memory)
    fields = state["fields"]
    assert state["type"] == "MmioTransport" and fields["status"] & spec.STATUS_DRIVER_OK
    assert fields["queues"][0]["ring"]["next_avail"] == 3 and fields["queues"][0]["ring"]["next_used"] == 3
    assert fields["device"]["type"] == "VirtioBlock"
    restored = make_transport(tmp_path, memory)
    try:
        restored.restore_state(state)
        assert restored.state() == state
        driver = MmioDriver(restored)
        assert driver.status() == fields["status"]
        driver.write32(regs.QUEUE_SEL_OFFSET, 0)
        assert driver.read32(regs.QUEUE_READY_OFFSET) == 1
        restored.process_queue(0)
        # Only the request published after the save is run: the first three are not run again.
        assert block.queue.used_idx() == 4
        assert block.status_of(pending) == S_OK
        assert block.data_of(pending) == b"S1".ljust(20, b"\0")
    finally:
        restored.close()


@pytest.mark.parametrize("worker_first", [True, False], ids=["worker-then-restore", "restore-then-worker"])
def test_restore_kicks_every_queue_when_started(tmp_path, memory, worker_first) -> None:
    state, block, pending = saved_mid_run(tmp_path, memory)
    restored = make_transport(tmp_path, memory)
    # As the machine wires it: a restore attaches the disk (and its worker) before the state.
    worker = QueueWorker("vda", restored.queue_count, restored.process_queue, restored.has_pending)
    try:
        if worker_first:
            restored.use_worker(worker)
        restored.restore_state(state)
        if not worker_first:
            restored.use_worker(worker)
        worker.start()  # nobody notifies: the request the guest queued before the save is found
        deadline = time.monotonic() + 5
        while block.queue.used_idx() != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert block.queue.used_idx() == 4 and block.status_of(pending) == S_OK
    finally:
        worker.close()
        restored.close()


def test_event_idx_positions_are_kept(tmp_path, memory) -> None:
    transport = make_transport(tmp_path, memory)
    features = MmioDriver(transport).device_features()
    transport.close()
    (tmp_path / "disk.raw").unlink()
    state, _, _ = saved_mid_run(tmp_path, memory, features)
    ring = state["fields"]["queues"][0]["ring"]
    assert state["fields"]["driver_features"] & (1 << spec.F_RING_EVENT_IDX)
    assert ring["signalled_used"] == 3 and ring["used_since_interrupt"] == 0


def test_a_fresh_transport_state_has_no_rings(tmp_path, memory) -> None:
    transport = make_transport(tmp_path, memory)
    try:
        state = transport.state()
        assert state["fields"]["status"] == 0 and state["fields"]["queues"][0]["ring"] is None
        transport.restore_state(json.loads(json.dumps(state)))
        assert transport.state() == state
    finally:
        transport.close()


def _damage(state: dict, how: str) -> dict:
    damaged = copy.deepcopy(state)
    fields = damaged["fields"]
    queue = fields["queues"][0]
    if how == "type":
        damaged["type"] = "Serial16550A"
    elif how == "version":
        damaged["version"] = 99
    elif how == "missing-field":
        del fields["queue_sel"]
    elif how == "negative-status":
        fields["status"] = -1
    elif how == "bool-register":
        fields["queue_sel"] = True
    elif how == "huge-address":
        queue["desc"] = 1 << 64
    elif how == "ready-not-bool":
        queue["ready"] = "yes"
    elif how == "ring-index":
        queue["ring"]["next_avail"] = 70000
    elif how == "ring-fields":
        queue["ring"] = {"next_avail": 1}
    elif how == "ring-outside-ram":
        queue["device"] = MEMORY_SIZE * 4
    elif how == "ring-not-running":
        fields["status"] = spec.STATUS_ACKNOWLEDGE
    elif how == "features":
        fields["device_features"] ^= 1 << spec.F_RING_EVENT_IDX
    elif how == "queues":
        fields["queues"].append(copy.deepcopy(queue))
    elif how == "blk-serial":
        fields["device"]["fields"]["serial"] = b"other".ljust(20, b"\0").hex()
    elif how == "blk-capacity":
        fields["device"]["fields"]["capacity_sectors"] += 1
    elif how == "blk-features":
        fields["device"]["fields"]["driver_features"] = "all"
    elif how == "blk-type":
        fields["device"] = {"type": "VirtioNet", "version": 1, "fields": {}}
    elif how == "not-a-dict":
        return ["MmioTransport"]  # type: ignore[return-value]
    return damaged


DAMAGES = ["type", "version", "missing-field", "negative-status", "bool-register", "huge-address", "ready-not-bool",
           "ring-index", "ring-fields", "ring-outside-ram", "ring-not-running", "features", "queues", "blk-serial",
           "blk-capacity", "blk-features", "blk-type", "not-a-dict"]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_transport_states_are_refused_and_change_nothing(tmp_path, memory, how: str) -> None:
    state, _, _ = saved_mid_run(tmp_path, memory)
    restored = make_transport(tmp_path, memory)
    try:
        before = restored.state()
        with pytest.raises(ConfigError) as error:
            restored.restore_state(_damage(state, how))
        assert "\n" not in str(error.value) and "vda" in str(error.value)
        assert restored.state() == before
    finally:
        restored.close()


def test_a_read_only_disk_state_does_not_restore_onto_a_writable_one(tmp_path, memory) -> None:
    transport = make_transport(tmp_path, memory, read_only=True)
    state = transport.state()
    transport.close()
    writable = make_transport(tmp_path, memory)
    try:
        with pytest.raises(ConfigError, match="features"):
            writable.restore_state(state)
    finally:
        writable.close()


def test_virtqueue_ring_state(memory) -> None:
    queue = Virtqueue(memory, 16, 0x1000, 0x2000, 0x3000, event_idx=True)
    queue.restore_ring_state({"next_avail": 5, "next_used": 4, "signalled_used": None, "used_since_interrupt": 1})
    assert queue.ring_state() == {"next_avail": 5, "next_used": 4, "signalled_used": None, "used_since_interrupt": 1}
    assert queue.next_avail == 5 and queue.next_used == 4
    for bad in ({"next_avail": -1, "next_used": 0, "signalled_used": None, "used_since_interrupt": 0},
                {"next_avail": 0, "next_used": 0, "signalled_used": "x", "used_since_interrupt": 0},
                {"next_avail": 0}, None):  # fmt: skip
        with pytest.raises(VirtqueueError):
            queue.restore_ring_state(bad)
    assert queue.next_avail == 5


def test_blk_state_round_trip(tmp_path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8192))
    device = VirtioBlock(RawFile(str(image)), serial="abc")
    try:
        device.activate(1 << 13)  # DISCARD negotiated
        state = json.loads(json.dumps(device.state()))
        assert state["fields"] == {"driver_features": 1 << 13, "capacity_sectors": 16, "serial": device.serial.hex(),
                                   "read_only": False}  # fmt: skip
        device.reset()
        device.restore_state(state)
        assert device.state() == state
    finally:
        device.close()


def test_blk_replace_backend_needs_the_same_disk(tmp_path) -> None:
    first, second, other = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "c.raw"
    first.write_bytes(bytes(8192))
    second.write_bytes(bytes(8192))
    other.write_bytes(bytes(4096))
    device = VirtioBlock(RawFile(str(first)))
    try:
        smaller = RawFile(str(other))
        with pytest.raises(ConfigError):
            device.replace_backend(smaller)
        smaller.close()
        old = device.replace_backend(RawFile(str(second)))
        old.close()
        assert device.backend.size == 8192
    finally:
        device.close()


def test_close_actions_run_after_the_backend_closes(tmp_path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    device = VirtioBlock(RawFile(str(image)))
    seen: list[str] = []
    device.add_close_action(lambda: seen.append("closed"))
    device.close()
    assert seen == ["closed"]


def test_worker_stop_drains_the_batch_in_hand() -> None:
    started, finished = threading.Event(), []

    def handler(index: int) -> None:
        started.set()
        time.sleep(0.2)  # a slow request
        finished.append(index)

    worker = QueueWorker("test", 1, handler)
    worker.start()
    try:
        worker.kick(0)
        assert started.wait(5)
        assert worker.stop() is True
        assert finished == [0]  # stop waited for the request the thread had taken
        assert not worker.running
        worker.start()  # and the worker goes on after a save
        worker.kick(0)
        deadline = time.monotonic() + 5
        while len(finished) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finished == [0, 0]
    finally:
        worker.close()
