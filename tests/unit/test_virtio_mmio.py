"""The virtio-mmio transport (virtio 1.2 §4.2.2): registers, negotiation, status, reset, notify."""

from __future__ import annotations

import threading
import time

import pytest

from hypervisor.block.raw import RawFile
from hypervisor.devices.bus import Bus, NullInterruptLine
from hypervisor.devices.gate import gate_of
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import mmio, spec
from hypervisor.virtio import mmio_registers as regs
from hypervisor.virtio.blk import VirtioBlock
from hypervisor.virtio.blk_request import S_OK, T_GET_ID
from hypervisor.virtio.worker import QueueWorker
from tests.virtio_driver import Allocator, BlockDriver, DriverQueue, MmioDriver

MEMORY_SIZE = 1 << 20


class CountingLine(NullInterruptLine):
    """Remembers pulses and lets a test wait for one from another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def pulse(self) -> None:
        super().pulse()
        self.event.set()


@pytest.fixture
def setup(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(64 * 1024))
    memory = GuestMemory.flat(MEMORY_SIZE)
    line = CountingLine()
    transport = mmio.MmioTransport(VirtioBlock(RawFile(str(image)), serial="S1"), memory, line, name="vda")
    yield transport, MmioDriver(transport), memory, line
    transport.close()
    memory.close()


def ready_device(transport, driver, memory, size=16):
    allocator = Allocator(0x1000, MEMORY_SIZE)
    assert driver.negotiate()
    queue = DriverQueue(memory, allocator, size)
    driver.setup_queue(0, queue)
    driver.driver_ok()
    return BlockDriver(memory, allocator, queue)


def test_identification_registers(setup):
    _, driver, _, _ = setup
    assert driver.read32(regs.MAGIC_VALUE_OFFSET) == 0x74726976
    assert driver.read32(regs.VERSION_OFFSET) == 2
    assert driver.read32(regs.DEVICE_ID_OFFSET) == spec.DeviceId.BLOCK
    assert driver.read32(regs.VENDOR_ID_OFFSET) == regs.VENDOR_ID
    assert driver.read32(regs.STATUS_OFFSET) == 0


def test_device_features_in_32_bit_pages(setup):
    _, driver, _, _ = setup
    features = driver.device_features()
    assert features & (1 << spec.F_VERSION_1)
    assert features & (1 << spec.F_RING_EVENT_IDX)
    assert features & (1 << spec.F_RING_INDIRECT_DESC)
    driver.write32(regs.DEVICE_FEATURES_SEL_OFFSET, 2)
    assert driver.read32(regs.DEVICE_FEATURES_OFFSET) == 0


def test_queue_registers(setup):
    _, driver, _, _ = setup
    driver.write32(regs.QUEUE_SEL_OFFSET, 0)
    assert driver.read32(regs.QUEUE_NUM_MAX_OFFSET) == 256
    assert driver.read32(regs.QUEUE_READY_OFFSET) == 0
    driver.write32(regs.QUEUE_SEL_OFFSET, 1)  # blk has one queue
    assert driver.read32(regs.QUEUE_NUM_MAX_OFFSET) == 0


def test_negotiation_accepts_offered_features(setup):
    transport, driver, _, _ = setup
    assert driver.negotiate()
    assert transport.driver_features == driver.device_features()


def test_features_ok_does_not_stick_for_unoffered_features(setup):
    _, driver, _, _ = setup
    offered = driver.device_features()
    assert not driver.negotiate(offered | (1 << 40))
    assert driver.status() == spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER


def test_features_ok_requires_version_1(setup):
    _, driver, _, _ = setup
    assert not driver.negotiate(driver.device_features() & ~(1 << spec.F_VERSION_1))


def test_driver_ok_without_features_ok_does_not_stick(setup):
    _, driver, _, _ = setup
    driver.add_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
    driver.add_status(spec.STATUS_DRIVER_OK)
    assert not driver.status() & spec.STATUS_DRIVER_OK


def test_status_bits_cannot_be_cleared_without_reset(setup):
    _, driver, _, _ = setup
    assert driver.negotiate()
    driver.write32(regs.STATUS_OFFSET, spec.STATUS_ACKNOWLEDGE)
    assert driver.status() & spec.STATUS_FEATURES_OK


def test_reset_clears_status_features_and_queues(setup):
    transport, driver, memory, _ = setup
    ready_device(transport, driver, memory)
    driver.write32(regs.QUEUE_SEL_OFFSET, 0)
    assert driver.read32(regs.QUEUE_READY_OFFSET) == 1
    driver.write32(regs.STATUS_OFFSET, 0)
    assert driver.status() == 0
    assert transport.driver_features == 0
    assert driver.read32(regs.QUEUE_READY_OFFSET) == 0
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == 0


def test_queue_configuration_ignored_while_ready(setup):
    transport, driver, memory, _ = setup
    ready_device(transport, driver, memory)
    driver.write32(regs.QUEUE_DESC_LOW_OFFSET, 0x123000)
    assert transport._queues[0].desc != 0x123000


def test_config_space_and_generation(setup):
    transport, driver, _, line = setup
    capacity = int.from_bytes(driver.read_config(0, 8), "little")
    assert capacity == 64 * 1024 // 512
    # Linux reads a 64-bit field as two 32-bit reads (§4.2.2.2 allows it for config space).
    low = int.from_bytes(driver.read_config(0, 4), "little")
    high = int.from_bytes(driver.read_config(4, 4), "little")
    assert (high << 32) | low == capacity
    assert driver.read_config(0x1000 - 0x100 - 4, 4) == bytes(4)  # past the config: zeros
    generation = driver.read32(regs.CONFIG_GENERATION_OFFSET)
    assert driver.read32(regs.CONFIG_GENERATION_OFFSET) == generation
    assert driver.negotiate()
    driver.driver_ok()
    transport.config_changed()
    assert driver.read32(regs.CONFIG_GENERATION_OFFSET) == generation + 1
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) & spec.INTERRUPT_CONFIG_CHANGE
    assert line.pulses == 1


@pytest.mark.parametrize("offset, size", [(0x001, 4), (0x000, 2), (0x070, 1), (0x004, 8)])
def test_unaligned_or_wrongly_sized_register_access_is_answered(setup, offset, size):
    transport, driver, _, _ = setup
    data = bytearray(b"\xaa" * size)
    transport.read(offset, memoryview(data))
    assert data == bytes(size)
    transport.write(offset, b"\xff" * size)  # ignored, not raised
    assert driver.status() == 0


def test_unknown_register_reads_zero(setup):
    _, driver, _, _ = setup
    assert driver.read32(0x0E0) == 0
    assert driver.read32(regs.SHM_LEN_LOW_OFFSET) == 0xFFFFFFFF  # no shared memory regions


def test_transport_sits_on_a_bus(setup):
    transport, _, _, _ = setup
    bus = Bus("mmio", 1 << 32)
    bus.insert(transport, 0xD000_0000, mmio.WINDOW_SIZE, "vda")
    data = bytearray(4)
    assert bus.read(0xD000_0000, memoryview(data))
    assert int.from_bytes(data, "little") == regs.MAGIC_VALUE


def test_bad_ring_address_sets_needs_reset_with_config_interrupt(setup):
    transport, driver, _, line = setup
    assert driver.negotiate()
    driver.write32(regs.QUEUE_SEL_OFFSET, 0)
    driver.write32(regs.QUEUE_NUM_OFFSET, 16)
    driver.write32(regs.QUEUE_DESC_LOW_OFFSET, 0)
    driver.write32(regs.QUEUE_DESC_HIGH_OFFSET, 0x10)  # 64 GiB: outside guest RAM
    driver.write32(regs.QUEUE_READY_OFFSET, 1)
    driver.driver_ok()
    assert driver.status() & spec.STATUS_DEVICE_NEEDS_RESET
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == spec.INTERRUPT_CONFIG_CHANGE
    assert line.pulses == 1
    driver.write32(regs.INTERRUPT_ACK_OFFSET, spec.INTERRUPT_CONFIG_CHANGE)
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == 0
    driver.write32(regs.STATUS_OFFSET, 0)  # reset recovers the device
    assert driver.status() == 0


def test_queue_size_above_maximum_needs_reset(setup):
    transport, driver, memory, _ = setup
    assert driver.negotiate()
    queue = DriverQueue(memory, Allocator(0x1000, MEMORY_SIZE), 512)
    driver.setup_queue(0, queue)
    driver.driver_ok()
    assert driver.status() & spec.STATUS_DEVICE_NEEDS_RESET


def test_requests_before_driver_ok_are_not_processed(setup):
    transport, driver, memory, _ = setup
    assert driver.negotiate()
    allocator = Allocator(0x1000, MEMORY_SIZE)
    queue = DriverQueue(memory, allocator, 16)
    driver.setup_queue(0, queue)
    request = BlockDriver(memory, allocator, queue).submit(T_GET_ID, in_length=20)
    transport.process_queue(0)
    assert queue.take_used() == []
    driver.driver_ok()
    transport.process_queue(0)
    assert queue.take_used() == [(request.head, 21)]


def wire_worker(transport: mmio.MmioTransport) -> QueueWorker:
    """The I/O thread as the machine makes it (Machine.attach_disks): the transport only gets it."""
    worker = QueueWorker(transport.name, transport.queue_count, transport.process_queue, transport.has_pending)
    transport.use_worker(worker)
    return worker


def test_notify_through_eventfd_wakes_the_io_thread(setup):
    transport, driver, memory, line = setup
    blk = ready_device(transport, driver, memory)
    worker = wire_worker(transport)
    worker.start()
    try:
        request = blk.submit(T_GET_ID, in_length=20)
        driver.notify(0)  # no ioeventfd registered: the transport writes the eventfd itself
        assert line.event.wait(5), "no interrupt from the I/O thread"
        assert blk.status_of(request) == S_OK
        assert blk.data_of(request) == b"S1".ljust(20, b"\0")
        assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == spec.INTERRUPT_USED_BUFFER
    finally:
        worker.close()


def test_eventfd_written_externally_like_an_ioeventfd(setup):
    import os

    transport, driver, memory, line = setup
    blk = ready_device(transport, driver, memory)
    worker = wire_worker(transport)
    worker.start()
    try:
        request = blk.submit(T_GET_ID, in_length=20)
        os.eventfd_write(worker.eventfd(0), 1)  # what KVM does for an ioeventfd
        assert line.event.wait(5)
        assert blk.status_of(request) == S_OK
    finally:
        worker.close()


def test_stop_is_prompt_and_restartable(setup):
    transport, *_ = setup
    worker = wire_worker(transport)
    worker.start()
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1
    worker.start()
    assert transport.io_running  # what the snapshot's drain asks
    assert transport.stop() and not worker.running
    worker.close()


def test_the_transport_starts_no_thread_of_its_own(setup):
    transport, driver, memory, line = setup
    before = set(threading.enumerate())
    blk = ready_device(transport, driver, memory)
    blk.submit(T_GET_ID, in_length=20)
    driver.notify(0)  # no worker given: nothing runs until someone calls process_queue
    assert set(threading.enumerate()) == before and not transport.io_running
    assert line.pulses == 0
    transport.process_queue(0)
    assert line.pulses == 1


def test_close_is_idempotent_and_late_notifies_are_harmless(setup):
    transport, driver, _, _ = setup
    worker = wire_worker(transport)
    worker.start()
    worker.close()  # the machine joins the I/O thread before it closes the device
    transport.close()
    transport.close()
    driver.notify(0)  # a vCPU that races with shutdown must not crash the process


def test_a_reset_waits_for_the_pass_in_flight(setup):
    transport, driver, memory, _ = setup
    blk = ready_device(transport, driver, memory)
    worker = wire_worker(transport)
    in_request, release = threading.Event(), threading.Event()
    real = transport.device.process_queue

    def slow_process_queue(index, ring):
        in_request.set()
        assert release.wait(5)
        real(index, ring)

    transport.device.process_queue = slow_process_queue
    request = blk.submit(T_GET_ID, in_length=20)
    io = threading.Thread(target=transport.process_queue, args=(0,))
    io.start()
    assert in_request.wait(5)
    # The request runs outside the bus lock: register reads do not wait for the disk.
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == 0
    reset = threading.Thread(target=driver.write32, args=(regs.STATUS_OFFSET, 0))
    reset.start()
    reset.join(0.2)
    assert reset.is_alive(), "the reset did not wait for the request in flight"
    release.set()
    reset.join(5)
    io.join(5)
    assert blk.status_of(request) == S_OK  # finished before the reset took effect
    assert driver.status() == 0
    worker.close()


def test_the_interrupt_is_pulsed_after_the_bus_lock_is_released(setup):
    transport, driver, memory, line = setup
    Bus("mmio", 1 << 32).insert(transport, 0xD000_0000, mmio.WINDOW_SIZE, "vda")
    gate = gate_of(transport)
    assert gate is not None
    seen: list[bool] = []

    def pulse() -> None:
        seen.append(gate.locked())
        # Re-entering the device from its own effect does not deadlock.
        seen.append(driver.read32(regs.INTERRUPT_STATUS_OFFSET) == spec.INTERRUPT_USED_BUFFER)

    line.pulse = pulse
    blk = ready_device(transport, driver, memory)
    blk.submit(T_GET_ID, in_length=20)
    transport.process_queue(0)
    assert seen == [False, True]


def test_notify_for_nonexistent_queue_is_ignored(setup):
    transport, driver, memory, line = setup
    ready_device(transport, driver, memory)
    driver.notify(7)
    driver.notify(0xFFFF_FFFF)
    assert line.pulses == 0


def test_failed_status_stops_processing(setup):
    transport, driver, memory, _ = setup
    blk = ready_device(transport, driver, memory)
    driver.add_status(spec.STATUS_FAILED)
    blk.submit(T_GET_ID, in_length=20)
    transport.process_queue(0)
    assert blk.queue.take_used() == []


def test_queue_ready_zero_stops_the_queue(setup):
    transport, driver, memory, _ = setup
    blk = ready_device(transport, driver, memory)
    driver.write32(regs.QUEUE_SEL_OFFSET, 0)
    driver.write32(regs.QUEUE_READY_OFFSET, 0)
    assert driver.read32(regs.QUEUE_READY_OFFSET) == 0
    blk.submit(T_GET_ID, in_length=20)
    assert not transport.has_pending(0)
    transport.process_queue(0)
    assert blk.queue.take_used() == []


def test_has_pending_sees_published_buffers(setup):
    transport, driver, memory, _ = setup
    blk = ready_device(transport, driver, memory)
    assert not transport.has_pending(0)
    blk.submit(T_GET_ID, in_length=20)
    assert transport.has_pending(0)
    transport.process_queue(0)
    assert not transport.has_pending(0)


def test_interrupt_ack_clears_only_the_acknowledged_bits(setup):
    transport, driver, memory, _ = setup
    blk = ready_device(transport, driver, memory)
    blk.submit(T_GET_ID, in_length=20)
    transport.process_queue(0)
    transport.config_changed()
    both = spec.INTERRUPT_USED_BUFFER | spec.INTERRUPT_CONFIG_CHANGE
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == both
    driver.write32(regs.INTERRUPT_ACK_OFFSET, spec.INTERRUPT_USED_BUFFER)
    assert driver.read32(regs.INTERRUPT_STATUS_OFFSET) == spec.INTERRUPT_CONFIG_CHANGE


def test_driver_features_outside_negotiation_are_ignored(setup):
    transport, driver, _, _ = setup
    driver.write_driver_features(1 << spec.F_VERSION_1)  # before DRIVER: ignored
    assert transport.driver_features == 0
    assert driver.negotiate()
    accepted = transport.driver_features
    driver.write_driver_features(0)  # after FEATURES_OK: ignored
    driver.write32(regs.DRIVER_FEATURES_SEL_OFFSET, 5)  # no such page
    driver.write32(regs.DRIVER_FEATURES_OFFSET, 0xFFFFFFFF)
    assert transport.driver_features == accepted


def test_config_space_writes_are_ignored(setup):
    _, driver, _, _ = setup
    before = driver.read_config(0, 60)
    driver.transport.write(regs.CONFIG_OFFSET, b"\xff" * 8)
    assert driver.read_config(0, 60) == before
