"""Two vCPUs under load (issue 12): start and stop, acknowledged pause and resume, a fault on one
vCPU ending the run with that vCPU named, and one device used at once by both vCPUs and a disk's
I/O thread, with every access counted exactly.

The guests are tests/guests/user_mode.S in the SMP modes of common.S: the boot vCPU waits at a
gate (a port read answering 0), the test gives vCPU 1 the boot vCPU's registers there, opens the
gate, and each vCPU then tags its writes with its local APIC ID. Waits are bounded by deadlines
and pytest-timeout; nothing asserts how long anything took.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.devices.gate import GatedDevice
from hypervisor.disk_spec import DiskSpec
from hypervisor.kvm.vcpu import MP_STATE_RUNNABLE
from hypervisor.machine import Machine
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.report import build_report
from hypervisor.virtio.blk_request import S_OK, T_IN, T_OUT
from tests.guests.build import GUEST_BASE, MODE_SMP_COUNT, MODE_SMP_FOREVER, with_parameters
from tests.virtio_driver import Allocator, BlockDriver, DriverQueue, MmioDriver

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

PORT = 0x520
TAG_SHIFT = 24  # common.S: a value's bits 31:24 are the writer's APIC ID, the rest its count
SEQUENCE_MASK = (1 << TAG_SHIFT) - 1
IO_THREAD = "io"
DEADLINE = 60.0  # seconds a condition may take on a loaded 2-core host before the test fails
SECTOR = 512


def wait_until(condition: Callable[[], bool], what: str, seconds: float = DEADLINE) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        time.sleep(0.002)


class SmpPort(GatedDevice):
    """The SMP guests' 4-byte port: reads are the gate (0 until `open_gate`), writes are counted
    per thread and per APIC ID tag. The bus gives it one lock; its update is deliberately not
    atomic (a thread switch between reading and writing the total, as a device that does real
    work would invite), so two threads inside it at once would show as an overlap or a lost count.
    `host_access` is how another host thread (a disk's I/O thread) uses it, under the same lock."""

    def __init__(self, vcpu1_waits_for: int = 0) -> None:
        self.gate_open = False
        # The gate stays shut for vCPU 1 until vCPU 0 wrote this many times (vCPU 0 is then
        # provably running whatever vCPU 1 does next).
        self.vcpu1_waits_for = vcpu1_waits_for
        self.gate_reads = 0
        self.total = 0
        self.overlaps = 0
        self.odd_sizes = 0
        self._inside = False
        self.by_thread: Counter[str] = Counter()
        self.by_tag: Counter[int] = Counter()
        self.sequences: defaultdict[int, list[int]] = defaultdict(list)  # tag -> counts, in order
        self.threads_of_tag: defaultdict[int, set[str]] = defaultdict(set)
        self.order: list[str] = []  # who, access by access

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, bytes(data))

    def host_access(self) -> None:
        self._serialised(self._record, IO_THREAD)

    def open_gate(self) -> None:
        self._serialised(setattr, self, "gate_open", True)

    def _read(self, data: memoryview) -> None:
        self.gate_reads += 1
        is_open = self.gate_open
        if threading.current_thread().name == "vcpu1" and self.by_tag[0] < self.vcpu1_waits_for:
            is_open = False
        data[:] = int(is_open).to_bytes(len(data), "little")

    def _write(self, data: bytes) -> None:
        if len(data) != 4:
            self.odd_sizes += 1
        value = int.from_bytes(data, "little")
        tag = value >> TAG_SHIFT
        thread = self._record(threading.current_thread().name)
        self.by_tag[tag] += 1
        self.sequences[tag].append(value & SEQUENCE_MASK)
        self.threads_of_tag[tag].add(thread)

    def _record(self, who: str) -> str:
        if self._inside:
            self.overlaps += 1
        self._inside = True
        total = self.total
        time.sleep(0)  # lets any other thread run here, if the bus let it in
        self.total = total + 1
        self.by_thread[who] += 1
        self.order.append(who)
        self._inside = False
        return who


def smp_machine(guest_binary, mode: int, count: int = 0, port: SmpPort | None = None) -> tuple[Machine, SmpPort]:
    machine = Machine(16, cpus=2, console=MemoryConsole())
    image = with_parameters(guest_binary("user_mode").read_bytes(), mode=mode, port=PORT, count=count)
    machine.load_raw_bytes(image, GUEST_BASE, "user_mode")
    port = port or SmpPort()
    machine.add_port_device(port, PORT, 4, "smp port")
    return machine, port


def start_both(machine: Machine, port: SmpPort) -> None:
    machine.start()
    bring_up_vcpu1(machine, port)


def bring_up_vcpu1(machine: Machine, port: SmpPort) -> None:
    """Once the boot vCPU waits at the gate, vCPU 1 (an AP waiting for a SIPI) gets its registers,
    keeping its own APIC base (no BSP flag), and the gate opens for both."""
    wait_until(lambda: port.gate_reads > 0 or machine.control.finished.is_set(), "the boot vCPU reaching the gate")
    assert not machine.control.finished.is_set(), machine.control.outcome
    assert machine.pause(wait=True, timeout=DEADLINE)
    boot, second = machine.vcpus
    sregs = dataclasses.replace(boot.get_sregs(), apic_base=second.get_sregs().apic_base)
    second.set_sregs(sregs)
    second.set_regs(**boot.get_regs())
    second.set_mp_state(MP_STATE_RUNNABLE)
    port.open_gate()
    machine.resume()


def both_past(port: SmpPort, counts: dict[int, int]) -> Callable[[], bool]:
    """Whether each vCPU (by tag) wrote more than its count in `counts`."""
    return lambda: all(port.by_tag[tag] > count for tag, count in counts.items())


def vcpu_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("vcpu")]


def kvm_fds() -> list[str]:
    """This process's open descriptors on /dev/kvm and its VM and vCPU inodes."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if "kvm" in target:
            found.append(target)
    return found


def assert_tags_exact(port: SmpPort, tags: Sequence[int], count: int) -> None:
    """Each tag wrote `count` whole values, count down to 1 in order, all from one vCPU thread."""
    for tag in tags:
        assert port.by_tag[tag] == count, (tag, port.by_tag)
        assert port.sequences[tag] == list(range(count, 0, -1)), f"vCPU {tag}: values lost, torn or reordered"
        assert port.threads_of_tag[tag] == {f"vcpu{tag}"}


@pytest.mark.timeout(300)
def test_start_and_stop_under_load_leave_no_thread_or_descriptor(guest_binary) -> None:
    """20 machines whose two vCPUs both loop on port writes, stopped three ways: a requested stop,
    close() while running, close() while paused. Each time every vCPU thread ends and no KVM
    descriptor is left open."""
    vcpu_threads_before = set(vcpu_threads())  # none, unless an earlier test leaked some
    kvm_fds_before = sorted(kvm_fds())
    descriptors_before = len(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    for cycle in range(20):
        machine, port = smp_machine(guest_binary, MODE_SMP_FOREVER)
        try:
            start_both(machine, port)
            wait_until(both_past(port, {0: 49, 1: 49}), f"cycle {cycle}: both vCPUs writing")
            if cycle % 3 == 0:
                machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
                result = machine.wait(DEADLINE)
                assert result.outcome.kind is OutcomeKind.INTERRUPTED
                assert all(stats["python_exits"] >= 50 for stats in result.per_vcpu)
            elif cycle % 3 == 2:
                assert machine.pause(wait=True, timeout=DEADLINE)
        finally:
            closer = threading.Thread(target=machine.close, name=f"closer{cycle}")
            closer.start()
            closer.join(DEADLINE)
        assert not closer.is_alive(), f"cycle {cycle}: close() hung"
        assert machine.control.finished.is_set()
        assert machine.stuck_vcpu_threads() == [], f"cycle {cycle}: a vCPU thread lived on"
        assert set(vcpu_threads()) <= vcpu_threads_before
        assert set(threading.enumerate()) <= threads_before | {threading.current_thread()}
        assert sorted(kvm_fds()) == kvm_fds_before, f"cycle {cycle}: KVM descriptors left open"
        assert port.overlaps == 0 and port.odd_sizes == 0
    assert len(os.listdir("/proc/self/fd")) <= descriptors_before


def test_pause_and_resume_under_load_stop_and_restart_both_vcpus(guest_binary) -> None:
    """50 times: once pause() is acknowledged neither vCPU moves (registers, exit counters and
    the device's counts stay put); after resume() each vCPU writes again."""
    machine, port = smp_machine(guest_binary, MODE_SMP_FOREVER)
    with machine:
        start_both(machine, port)
        wait_until(both_past(port, {0: 0, 1: 0}), "both vCPUs writing")
        for cycle in range(50):
            assert machine.pause(wait=True, timeout=DEADLINE), f"cycle {cycle}: pause not acknowledged"
            assert machine.control.all_parked()
            counts = dict(port.by_tag)
            regs = [vcpu.get_regs() for vcpu in machine.vcpus]
            exits = [vcpu.run_calls for vcpu in machine.vcpus]
            time.sleep(0.01)  # any progress would show in this while
            assert [vcpu.get_regs() for vcpu in machine.vcpus] == regs, f"cycle {cycle}: a paused vCPU moved"
            assert [vcpu.run_calls for vcpu in machine.vcpus] == exits
            assert dict(port.by_tag) == counts
            machine.resume()
            wait_until(both_past(port, counts), f"cycle {cycle}: both vCPUs writing again after resume")
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
        result = machine.wait(DEADLINE)
    assert result.outcome.kind is OutcomeKind.INTERRUPTED
    assert machine.stuck_vcpu_threads() == []
    assert set(port.by_tag) == {0, 1} and port.threads_of_tag == {0: {"vcpu0"}, 1: {"vcpu1"}}
    assert port.overlaps == 0 and port.odd_sizes == 0


def test_a_triple_fault_on_vcpu_1_ends_the_run_naming_vcpu_1(guest_binary) -> None:
    """vCPU 1 starts once vCPU 0 wrote 100 times, writes 300 times and triple-faults while vCPU 0
    goes on writing. The run ends with the triple fault (not a timeout), the outcome and the JSON
    report name vCPU 1, and vCPU 0's thread is stopped too."""
    writes_before_fault = 300
    port = SmpPort(vcpu1_waits_for=100)
    machine, _ = smp_machine(guest_binary, MODE_SMP_FOREVER, count=writes_before_fault, port=port)
    with machine:
        start_both(machine, port)
        result = machine.wait(DEADLINE)
        threads = list(machine._threads)
        assert machine.stuck_vcpu_threads() == [] and not any(thread.is_alive() for thread in threads)
        second_rip = machine.vcpus[1].get_regs()["rip"]
        code = machine.memory.read(second_rip, 2) if machine.memory is not None else b""
    outcome = result.outcome
    assert outcome.kind is OutcomeKind.TRIPLE_FAULT, outcome
    assert outcome.data["vcpu"] == 1 and outcome.detail.startswith("vCPU 1: "), outcome
    assert code == b"\x0f\x0b"  # vCPU 1 stopped at its ud2
    report = build_report(result, None, {})
    assert report["outcome"] == "triple-fault" and report["exit_status"] == 120
    assert report["outcome_data"] == {"vcpu": 1} and "vCPU 1" in str(report["detail"])
    assert port.by_tag[1] == writes_before_fault and port.threads_of_tag[1] == {"vcpu1"}  # none after the fault
    assert port.by_tag[0] >= 100 and port.threads_of_tag[0] == {"vcpu0"}  # vCPU 0 ran alongside
    assert all(stats["python_exits"] > 0 for stats in result.per_vcpu)


def test_a_second_start_is_refused_and_the_run_still_stops(guest_binary) -> None:
    """start() twice would put a second thread on each vCPU, sharing its kvm_run: pauses then
    wait for threads that never park, and close() hangs (seen while writing these tests)."""
    machine, port = smp_machine(guest_binary, MODE_SMP_FOREVER)
    with machine:
        start_both(machine, port)
        with pytest.raises(RuntimeError, match="already started"):
            machine.start()
        assert [thread.name for thread in vcpu_threads()] == ["vcpu0", "vcpu1"]
        assert machine.pause(wait=True, timeout=DEADLINE)
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
        assert machine.wait(DEADLINE).outcome.kind is OutcomeKind.INTERRUPTED
    assert machine.stuck_vcpu_threads() == [] and not vcpu_threads()


class TouchingBackend:
    """A disk backend shim whose every read and write also uses the SmpPort from the I/O thread."""

    def __init__(self, inner, port: SmpPort) -> None:
        self.inner = inner
        self.port = port

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def readinto(self, offset, buffers) -> None:
        self.port.host_access()
        self.inner.readinto(offset, buffers)

    def write(self, offset, buffers) -> None:
        self.port.host_access()
        self.inner.write(offset, buffers)


def test_both_vcpus_and_the_io_thread_share_one_device_and_every_access_counts(guest_binary, tmp_path) -> None:
    """Both vCPUs write the port N times each while the disk's I/O thread serves virtio-blk
    requests (a host-side driver writes them to guest memory) and uses the same port on each.
    The port sees exactly 2N whole writes, N per vCPU in order, plus one access per request, and
    never two threads inside it at once."""
    writes = 20_000
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    machine, port = smp_machine(guest_binary, MODE_SMP_COUNT, count=writes)
    machine.attach_disks([DiskSpec(str(disk), format="raw")], wrap_backend=lambda inner: TouchingBackend(inner, port))
    requests = 0
    with machine:
        machine.start()
        # Play the guest's virtio driver from this thread (virtio 1.2 §3.1.1), in RAM the guest
        # does not use; the transport is served under its own bus lock, as for a vCPU.
        assert machine.memory is not None
        transport = machine.disks[0].transport
        driver = MmioDriver(transport)
        allocator = Allocator(0x200000, 0x400000)
        assert driver.negotiate()
        queue = DriverQueue(machine.memory, allocator, 16)
        driver.setup_queue(0, queue)
        driver.driver_ok()

        def round_trip(sector: int) -> None:
            nonlocal allocator, requests
            if allocator.next > 0x3F0000:  # reuse the buffer space: each request is finished
                allocator = Allocator(0x210000, 0x400000)
            block = BlockDriver(machine.memory, allocator, queue)
            payload = bytes([sector & 0xFF]) * SECTOR
            for request_type in (T_OUT, T_IN):
                seen = queue.used_idx()
                request = block.submit(request_type, sector, payload if request_type == T_OUT else b"",
                                       SECTOR if request_type == T_IN else 0)  # fmt: skip
                driver.notify(0)
                wait_until(lambda: queue.used_idx() != seen, "a virtio-blk request completing")  # noqa: B023
                queue.take_used()
                assert block.status_of(request) == S_OK
                requests += 1
            assert block.data_of(request) == payload

        round_trip(0)  # the I/O thread is working before the vCPUs count
        bring_up_vcpu1(machine, port)
        sector = 1
        while port.by_tag[0] < writes or port.by_tag[1] < writes:
            round_trip(sector % 2048)
            sector += 1
            assert not machine.control.finished.is_set(), machine.control.outcome
        round_trip(sector % 2048)
        # Both vCPUs spin without exits now: nothing more may arrive.
        assert machine.pause(wait=True, timeout=DEADLINE)
        machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "test"))
        result = machine.wait(DEADLINE)
    assert result.outcome.kind is OutcomeKind.INTERRUPTED
    assert_tags_exact(port, [0, 1], writes)
    assert port.by_thread["vcpu0"] == port.by_thread["vcpu1"] == writes
    assert port.by_thread[IO_THREAD] == requests
    assert port.total == 2 * writes + requests and port.overlaps == 0 and port.odd_sizes == 0
    # The three really overlapped: the I/O thread used the port between the vCPUs' writes.
    vcpu_positions = [index for index, who in enumerate(port.order) if who != IO_THREAD]
    first, last = vcpu_positions[0], vcpu_positions[-1]
    assert IO_THREAD in port.order[first:last]
