"""Exit dispatch fed with synthetic exits: no /dev/kvm needed."""

import pytest

from hypervisor.kvm.exits import ExitReason, InternalErrorSubtype, SystemEventType
from hypervisor.kvm.ffi import lib
from hypervisor.outcome import OutcomeKind
from hypervisor.vcpu.dispatch import (
    KvmExitInfo,
    classify_kvm_exit,
    dispatch_device_access,
)
from tests.unit.test_bus import Recorder

FLAG_INSTRUCTION_BYTES = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES


def test_port_write_reaches_the_device() -> None:
    device = Recorder()
    dispatch_device_access(lib.PYHV_EXIT_PIO_OUT, device, 3, 1, 1, memoryview(bytearray(b"\x80")))
    assert device.writes == [(3, b"\x80")]


def test_mmio_read_fills_the_exit_buffer() -> None:
    device = Recorder(fill=0x5A)
    buffer = bytearray(8)
    dispatch_device_access(lib.PYHV_EXIT_MMIO_READ, device, 0x10, 4, 1, memoryview(buffer)[:4])
    assert buffer[:4] == b"\x5a" * 4 and buffer[4:] == bytes(4)
    assert device.reads == [(0x10, 4)]


def test_string_io_is_split_into_elements() -> None:
    device = Recorder()
    dispatch_device_access(lib.PYHV_EXIT_PIO_OUT, device, 0, 2, 3, memoryview(bytearray(b"aabbcc")))
    assert device.writes == [(0, b"aa"), (0, b"bb"), (0, b"cc")]
    reader = Recorder(fill=7)
    buffer = bytearray(3)
    dispatch_device_access(lib.PYHV_EXIT_PIO_IN, reader, 5, 1, 3, memoryview(buffer))
    assert buffer == b"\x07\x07\x07" and len(reader.reads) == 3


@pytest.mark.parametrize(
    "info,kind",
    [
        (KvmExitInfo(ExitReason.SHUTDOWN), OutcomeKind.TRIPLE_FAULT),
        (KvmExitInfo(ExitReason.HLT), OutcomeKind.POWER_OFF),
        (KvmExitInfo(ExitReason.SYSTEM_EVENT, system_event=SystemEventType.RESET), OutcomeKind.RESET),
        (KvmExitInfo(ExitReason.SYSTEM_EVENT, system_event=SystemEventType.SHUTDOWN), OutcomeKind.POWER_OFF),
        (KvmExitInfo(ExitReason.SYSTEM_EVENT, system_event=SystemEventType.CRASH), OutcomeKind.PANIC),
        (KvmExitInfo(ExitReason.FAIL_ENTRY, hardware_reason=0x21), OutcomeKind.INTERNAL_ERROR),
        (KvmExitInfo(ExitReason.INTERNAL_ERROR, suberror=InternalErrorSubtype.DELIVERY_EV), OutcomeKind.INTERNAL_ERROR),
        (
            KvmExitInfo(ExitReason.INTERNAL_ERROR, suberror=InternalErrorSubtype.EMULATION),
            OutcomeKind.EMULATION_FAILURE,
        ),
        (KvmExitInfo(ExitReason.TPR_ACCESS), OutcomeKind.INTERNAL_ERROR),
        (KvmExitInfo(63), OutcomeKind.INTERNAL_ERROR),
    ],
)
def test_exits_that_end_the_run(info: KvmExitInfo, kind: OutcomeKind) -> None:
    action = classify_kvm_exit(info)
    assert action.stop is not None and action.stop.kind is kind


def test_interrupt_exits_continue() -> None:
    for reason in (ExitReason.INTR, ExitReason.IRQ_WINDOW_OPEN):
        action = classify_kvm_exit(KvmExitInfo(reason))
        assert action.stop is None and action.emulate is None


def test_emulation_failure_with_bytes_asks_for_emulation() -> None:
    # data[0] = flags, then insn_size and the bytes: clac (0f 01 ca) as KVM reports it.
    raw = bytes([3, 0x0F, 0x01, 0xCA]) + bytes(12)
    words = (FLAG_INSTRUCTION_BYTES, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))
    info = KvmExitInfo(ExitReason.INTERNAL_ERROR, suberror=InternalErrorSubtype.EMULATION, data=words)
    action = classify_kvm_exit(info)
    assert action.emulate is not None and action.emulate.instruction == b"\x0f\x01\xca"


def test_emulation_failure_without_bytes_ends_the_run() -> None:
    info = KvmExitInfo(ExitReason.INTERNAL_ERROR, suberror=InternalErrorSubtype.EMULATION, data=(0, 0, 0))
    action = classify_kvm_exit(info)
    assert action.stop is not None and action.stop.kind is OutcomeKind.EMULATION_FAILURE


def test_debug_exits_carry_their_registers() -> None:
    action = classify_kvm_exit(KvmExitInfo(ExitReason.DEBUG, debug={"pc": 0x1000, "exception": 1}))
    assert action.stop is None and action.debug["pc"] == 0x1000
