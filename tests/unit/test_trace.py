"""The JSON exit trace: header, one object per exit, C-path aggregates, bounded on write errors."""

from __future__ import annotations

import errno
import io
import json
import logging
import threading
from dataclasses import replace
from typing import Any

from hypervisor.debug.trace import TRACE_FORMAT, TRACE_VERSION, ExitTracer, JsonTracer, exit_record
from hypervisor.devices.serial import Serial16550A
from hypervisor.errors import KvmError
from hypervisor.kvm.stats import VcpuStats
from hypervisor.machine import RunResult
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.events import EmulationFailure, MmioAccess, PortIo, Shutdown
from hypervisor.vcpu.stats import merge_statistics, statistics_dict


class FakeContext:
    """The parts of ExitContext the tracer uses: the device and the registers (counted)."""

    def __init__(self, device: object = None, rip: int = 0x1234, fail: bool = False) -> None:
        self.device = device
        self.rip = rip
        self.fail = fail
        self.regs_calls = 0

    def regs(self) -> dict[str, int]:
        self.regs_calls += 1
        if self.fail:
            raise KvmError("KVM_GET_REGS", errno.EBADF)
        return {"rip": self.rip}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def serial_write(char: bytes = b"L", host_ns: int = 2500) -> PortIo:
    return PortIo(0, 0x3F8, 1, 1, True, char, "COM1", 0, host_ns)


def test_header_then_one_object_per_exit() -> None:
    stream, clock = io.StringIO(), Clock()
    tracer = JsonTracer(stream, clock=clock)
    clock.now += 0.25
    context = FakeContext(Serial16550A(), rip=0x1010)
    tracer(serial_write(), context)  # type: ignore[arg-type]
    header, record = lines(stream)
    assert header["type"] == "header" and header["format"] == TRACE_FORMAT and header["version"] == TRACE_VERSION
    assert record == {"type": "exit", "t": 0.25, "vcpu": 0, "kind": "io", "rip": 0x1010, "port": 0x3F8,
                      "dir": "out", "size": 1, "data": "4c", "device": "COM1", "register": "THR",
                      "meaning": "serial THR 'L'", "host_ns": 2500}  # fmt: skip
    assert tracer.records == 1


def test_rip_is_optional_and_costs_one_register_read() -> None:
    stream = io.StringIO()
    without = JsonTracer(stream, rip=False)
    context = FakeContext()
    without(serial_write(), context)  # type: ignore[arg-type]
    assert context.regs_calls == 0 and "rip" not in lines(stream)[1]
    with_rip = JsonTracer(io.StringIO())
    with_rip(serial_write(), context)  # type: ignore[arg-type]
    assert context.regs_calls == 1


def test_a_failing_register_read_leaves_rip_out() -> None:
    stream = io.StringIO()
    JsonTracer(stream)(serial_write(), FakeContext(fail=True))  # type: ignore[arg-type]
    assert "rip" not in lines(stream)[1]


def test_mmio_and_non_device_exits() -> None:
    read = exit_record(MmioAccess(1, 0xD000_0000, 4, False, b"virt", "vda", 0, 900), 1.5)
    assert (
        read["addr"] == 0xD000_0000
        and read["dir"] == "read"
        and read["meaning"] == "virtio vda MagicValue -> 0x74726976"
    )
    shutdown = exit_record(Shutdown(0, 10), 2.0)
    assert shutdown == {"type": "exit", "t": 2.0, "vcpu": 0, "kind": "shutdown", "host_ns": 10}
    failure = exit_record(EmulationFailure(0, b"\x0f\xae\x27", 0x1000), 0.0)
    assert failure["instruction"] == "0fae27" and failure["rip"] == 0x1000


def test_rep_outs_keeps_the_count() -> None:
    record = exit_record(PortIo(0, 0x3F8, 1, 3, True, b"abc", "COM1", 0), 0.0)
    assert record["count"] == 3 and record["data"] == "616263"


def test_finish_writes_c_path_aggregates_and_the_end() -> None:
    stream = io.StringIO()
    tracer = JsonTracer(stream)
    tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    per_vcpu = [
        statistics_dict(replace(VcpuStats.zero(), total_exits=10, python_exits=1, pio_sink=7, pio_unmapped_reads=2)),
        statistics_dict(replace(VcpuStats.zero(), total_exits=1, pio_sink=1)),
    ]
    result = RunResult(Outcome(OutcomeKind.DEBUG_EXIT, code=0), 1.2345, merge_statistics(per_vcpu, 0, 0), per_vcpu)
    tracer.finish(result)
    records = lines(stream)
    aggregates = [r for r in records if r["type"] == "aggregate"]
    assert [(r["vcpu"], r["counter"], r["count"]) for r in aggregates] == [
        (0, "pio_sink", 7), (0, "pio_unmapped_reads", 2), (1, "pio_sink", 1)]  # fmt: skip
    assert aggregates[1]["device"] == "unmapped port" and aggregates[1]["register"] == "read"
    end = records[-1]
    assert end["type"] == "end" and end["outcome"] == "debug-exit" and end["traced"] == 1 and end["total_exits"] == 11


class FullDisk(io.StringIO):
    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        if self.tell() + len(text) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_a_full_disk_stops_the_trace_with_one_warning(caplog) -> None:
    stream = FullDisk(room=400)
    tracer = JsonTracer(stream)
    with caplog.at_level(logging.WARNING, logger="hypervisor.debug.trace"):
        for _ in range(50):
            tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    assert tracer.failed == "No space left on device"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "guest runs on" in warnings[0].getMessage()
    attempts = stream.attempts
    tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    assert stream.attempts == attempts  # no more writes once stopped
    for line in stream.getvalue().splitlines():
        json.loads(line)  # what was written is whole lines


def test_a_closed_stream_is_a_stopped_trace_not_an_exception() -> None:
    stream = io.StringIO()
    tracer = JsonTracer(stream)
    stream.close()
    tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    assert tracer.failed


def test_vcpu_threads_write_whole_lines() -> None:
    stream = io.StringIO()
    tracer = JsonTracer(stream, rip=False)

    def vcpu(index: int) -> None:
        for _ in range(500):
            tracer(PortIo(index, 0x3F8, 1, 1, True, b"x", "COM1", 0), FakeContext())  # type: ignore[arg-type]

    threads = [threading.Thread(target=vcpu, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines(stream)[1:]
    assert len(records) == 2000 and tracer.records == 2000
    assert sorted({r["vcpu"] for r in records}) == [0, 1, 2, 3]


def test_text_trace_is_unchanged_and_bounded() -> None:
    stream = io.StringIO()
    tracer = ExitTracer(stream)
    tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    assert stream.getvalue().split(" ", 1)[1] == "vcpu0 pio-out port=0x3f8 size=1 data=4c\n"
    stream.close()
    tracer(serial_write(), FakeContext())  # type: ignore[arg-type]
    assert tracer.failed and tracer.lines == 1
