"""Split virtqueue (virtio 1.2 §2.7) against rings built by the driver mock in real GuestMemory."""

from __future__ import annotations

import pytest

from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import spec
from hypervisor.virtio.queue import Virtqueue, VirtqueueError, guest_buffer
from tests.virtio_driver import DESCRIPTOR, Allocator, Buffer, DriverQueue

MEMORY_SIZE = 1 << 20
QUEUE_SIZE = 8


@pytest.fixture
def memory():
    guest = GuestMemory.flat(MEMORY_SIZE)
    yield guest
    guest.close()


@pytest.fixture
def allocator() -> Allocator:
    return Allocator(0x1000, MEMORY_SIZE)


def make_queue(memory: GuestMemory, allocator: Allocator, size: int = QUEUE_SIZE, **features: bool):
    driver = DriverQueue(memory, allocator, size)
    device = Virtqueue(memory, size, driver.desc, driver.avail, driver.used, **features)
    return driver, device


def test_direct_chain_split_into_readable_and_writable(memory, allocator):
    driver, device = make_queue(memory, allocator)
    memory.write(0x8000, b"request!")
    driver.publish(driver.add_chain([Buffer(0x8000, 8, False), Buffer(0x9000, 4, True), Buffer(0x9100, 1, True)]))
    chains = list(device.iter_available())
    assert len(chains) == 1
    chain = chains[0]
    assert chain.head == 0
    assert b"".join(bytes(v) for v in chain.readable) == b"request!"
    assert (chain.readable_length, chain.writable_length) == (8, 5)
    chain.writable[0][:] = b"DATA"
    assert memory.read(0x9000, 4) == b"DATA"  # views are zero-copy into guest RAM


def test_indirect_chain(memory, allocator):
    driver, device = make_queue(memory, allocator, indirect=True)
    head = driver.add_indirect_chain([Buffer(0x8000, 16, False), Buffer(0x9000, 512, True)], allocator)
    driver.publish(head)
    (chain,) = device.iter_available()
    assert (chain.readable_length, chain.writable_length) == (16, 512)


def test_direct_descriptors_followed_by_an_indirect_table(memory, allocator):
    # §2.7.5.3.2: zero or more direct descriptors followed by one indirect descriptor.
    driver, device = make_queue(memory, allocator, indirect=True)
    table = allocator.take(16)
    memory.write(table, DESCRIPTOR.pack(0x9000, 64, spec.DESC_F_WRITE, 0))
    driver.write_descriptor(0, 0x8000, 16, spec.DESC_F_NEXT, 1)
    driver.write_descriptor(1, table, 16, spec.DESC_F_INDIRECT)
    driver.publish(0)
    (chain,) = device.iter_available()
    assert (chain.readable_length, chain.writable_length) == (16, 64)


def test_indirect_refused_when_not_negotiated(memory, allocator):
    driver, device = make_queue(memory, allocator, indirect=False)
    driver.publish(driver.add_indirect_chain([Buffer(0x8000, 16, False)], allocator))
    with pytest.raises(VirtqueueError, match="INDIRECT"):
        list(device.iter_available())


@pytest.mark.parametrize(
    "descriptors, message",
    [
        ([(0x8000, 16, spec.DESC_F_NEXT, 1), (0x8000, 16, spec.DESC_F_NEXT, 0)], "more than"),  # loop
        ([(0x8000, 16, spec.DESC_F_NEXT, 0)], "more than"),  # self loop
        ([(MEMORY_SIZE - 8, 16, 0, 0)], "not inside guest RAM"),
        ([(0x4000_0000, 16, 0, 0)], "not inside guest RAM"),
        ([(2**64 - 8, 16, 0, 0)], "wraps"),  # address + length overflows 64 bits
        (
            [(0x9000, 1, spec.DESC_F_WRITE | spec.DESC_F_NEXT, 1), (0x8000, 16, 0, 0)],
            "readable descriptor after",
        ),
        ([(0x8000, 16, spec.DESC_F_NEXT, QUEUE_SIZE)], "points at descriptor"),
    ],
    ids=["loop", "self-loop", "past-ram", "outside-ram", "overflow", "readable-after-writable", "bad-next"],
)
def test_malformed_chains_raise_virtqueue_error(memory, allocator, descriptors, message):
    driver, device = make_queue(memory, allocator)
    for index, descriptor in enumerate(descriptors):
        driver.write_descriptor(index, *descriptor)
    driver.publish(0)
    with pytest.raises(VirtqueueError, match=message):
        list(device.iter_available())


def test_chain_longer_than_queue_is_refused(memory, allocator):
    # A linear chain through all descriptors of the indirect table that is longer than the queue.
    driver, device = make_queue(memory, allocator, indirect=True)
    buffers = [Buffer(0x8000, 1, False)] * (QUEUE_SIZE + 1)
    driver.publish(driver.add_indirect_chain(buffers, allocator))
    with pytest.raises(VirtqueueError, match="longer than the queue size"):
        list(device.iter_available())


def test_indirect_inside_indirect_is_refused(memory, allocator):
    driver, device = make_queue(memory, allocator, indirect=True)
    inner = allocator.take(16)
    memory.write(inner, DESCRIPTOR.pack(0x8000, 16, 0, 0))
    outer = allocator.take(16)
    memory.write(outer, DESCRIPTOR.pack(inner, 16, spec.DESC_F_INDIRECT, 0))
    driver.write_descriptor(0, outer, 16, spec.DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(VirtqueueError, match="indirect table inside"):
        list(device.iter_available())


@pytest.mark.parametrize("length", [0, 24])
def test_indirect_table_of_bad_length_is_refused(memory, allocator, length):
    driver, device = make_queue(memory, allocator, indirect=True)
    driver.write_descriptor(0, 0x8000, length, spec.DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(VirtqueueError, match="whole number"):
        list(device.iter_available())


def test_available_index_jumping_past_queue_size_is_refused(memory, allocator):
    driver, device = make_queue(memory, allocator)
    memory.write_u16(driver.avail + 2, QUEUE_SIZE + 1)
    with pytest.raises(VirtqueueError, match="more than the queue size"):
        list(device.iter_available())


def test_head_outside_queue_is_refused(memory, allocator):
    driver, device = make_queue(memory, allocator)
    driver.publish(QUEUE_SIZE + 3)
    with pytest.raises(VirtqueueError, match="outside the queue"):
        list(device.iter_available())


@pytest.mark.parametrize(
    "size, desc_offset, message",
    [(6, 0, "power of 2"), (0, 0, "power of 2"), (65536, 0, "power of 2"), (8, 8, "aligned")],
)
def test_bad_queue_configuration(memory, size, desc_offset, message):
    with pytest.raises(VirtqueueError, match=message):
        Virtqueue(memory, size, 0x1000 + desc_offset, 0x2000, 0x3000)


def test_rings_outside_ram_are_refused(memory):
    with pytest.raises(VirtqueueError, match="not inside"):
        Virtqueue(memory, 256, MEMORY_SIZE - 0x100, 0x2000, 0x3000)


def test_used_ring_and_interrupt_without_event_idx(memory, allocator):
    driver, device = make_queue(memory, allocator)
    for _ in range(3):
        driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    for chain in device.iter_available():
        device.add_used(chain.head, 1)
    assert driver.take_used() == [(0, 1), (1, 1), (2, 1)]
    assert device.needs_interrupt() is True
    assert device.needs_interrupt() is False  # nothing new since
    driver.set_no_interrupt(True)
    driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    for chain in device.iter_available():
        device.add_used(chain.head, 1)
    assert device.needs_interrupt() is False  # VIRTQ_AVAIL_F_NO_INTERRUPT


def test_event_idx_suppresses_interrupts_until_used_event(memory, allocator):
    driver, device = make_queue(memory, allocator, event_idx=True)

    def complete(count: int) -> bool:
        for _ in range(count):
            driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
        for chain in device.iter_available():
            device.add_used(chain.head, 1)
        device.rearm()
        return device.needs_interrupt()

    assert complete(1) is True  # first completion always interrupts
    assert driver.avail_event() == 1  # device asks to be notified for the next buffer
    driver.set_used_event(5)  # driver: interrupt me once used idx passes 5
    assert complete(2) is False  # used idx 1 -> 3
    assert complete(2) is False  # 3 -> 5
    assert complete(1) is True  # 5 -> 6 crosses used_event
    assert complete(1) is False  # 6 -> 7: used_event 5 already passed


def test_rearm_reports_buffers_that_arrived_meanwhile(memory, allocator):
    driver, device = make_queue(memory, allocator, event_idx=True)
    driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    assert device.rearm() is True
    assert len(list(device.iter_available())) == 1
    assert device.rearm() is False


def test_index_wraps_at_16_bits(memory, allocator):
    driver, device = make_queue(memory, allocator)
    start = 0xFFFE
    driver.avail_idx = start
    device.next_avail = start
    device.next_used = start
    driver.last_used = start
    for _ in range(4):
        driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    heads = [chain.head for chain in device.iter_available()]
    for head in heads:
        device.add_used(head, 1)
    assert heads == [0, 1, 2, 3]
    assert driver.take_used() == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert driver.used_idx() == 2


def test_guest_buffer_spans_adjacent_regions():
    memory = GuestMemory([(0, 0x2000), (0x2000, 0x2000), (0x8000, 0x1000)])
    try:
        views = guest_buffer(memory, 0x1F00, 0x200)
        assert [len(v) for v in views] == [0x100, 0x100]
        del views  # GuestMemory.close() refuses while views are alive
        with pytest.raises(VirtqueueError):
            guest_buffer(memory, 0x3F00, 0x200)  # runs into the hole at 0x4000
        assert guest_buffer(memory, 0xDEAD_0000, 0) == []
    finally:
        memory.close()


def test_indirect_table_needs_only_8_byte_alignment(memory, allocator):
    # Linux kmallocs indirect tables; §2.7 requires no alignment for them (seen in a Linux boot).
    driver, device = make_queue(memory, allocator, indirect=True)
    table = allocator.take(40, 16) + 8
    memory.write(table, DESCRIPTOR.pack(0x8000, 16, spec.DESC_F_NEXT, 1))
    memory.write(table + 16, DESCRIPTOR.pack(0x9000, 1, spec.DESC_F_WRITE, 0))
    driver.write_descriptor(0, table, 32, spec.DESC_F_INDIRECT)
    driver.publish(0)
    (chain,) = device.iter_available()
    assert (chain.readable_length, chain.writable_length) == (16, 1)


def used_flags(memory: GuestMemory, driver: DriverQueue) -> int:
    return memory.read_u16(driver.used)


def test_notifications_off_while_polling_without_event_idx(memory, allocator):
    """§2.7.7: VIRTQ_USED_F_NO_NOTIFY while the device polls; turning it back on reports the
    buffers a driver added meanwhile without notifying."""
    driver, device = make_queue(memory, allocator)
    assert device.set_notifications(False) is False
    assert used_flags(memory, driver) & spec.USED_F_NO_NOTIFY
    driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))  # the driver skips its notify
    assert device.set_notifications(True) is True  # ... so the device must look again
    assert not used_flags(memory, driver) & spec.USED_F_NO_NOTIFY
    assert len(list(device.iter_available())) == 1
    assert device.set_notifications(True) is False


def test_notifications_off_while_polling_with_event_idx(memory, allocator):
    """§2.7.10: avail_event stays behind while polling (the driver's vring_need_event is false),
    and is set to the next index when notifications are turned back on."""
    driver, device = make_queue(memory, allocator, event_idx=True)
    driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    assert device.set_notifications(False) is True
    for chain in device.iter_available():
        device.add_used(chain.head, 1)
    assert device.rearm() is False
    assert driver.avail_event() == 0  # not moved to 1 while polling
    assert used_flags(memory, driver) == 0  # the flag is not used with EVENT_IDX
    driver.publish(driver.add_chain([Buffer(0x9000, 1, True)]))
    assert device.set_notifications(True) is True
    assert driver.avail_event() == 1
    list(device.iter_available())
    assert device.rearm() is False and driver.avail_event() == 2
