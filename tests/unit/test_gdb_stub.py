"""The gdb command layer against a fake target, with exchanges as Debian's gdb 13 sends them."""

from __future__ import annotations

import queue

import pytest

from hypervisor.debug.gdb.packets import decode_payload
from hypervisor.debug.gdb.stub import GdbStub
from hypervisor.debug.gdb.target import BreakKind, GdbTargetError, ResumeAction, StopEvent
from hypervisor.debug.gdb.target_xml import ARCH_I386, ARCH_X86_64, LAYOUTS

MEMORY_BASE = 0x1000
MEMORY_SIZE = 0x4000
DEBUG_REGISTER_SLOTS = 4


class FakeTarget:
    """A two-vCPU target with flat memory at MEMORY_BASE; records what the stub asked of it."""

    def __init__(self, vcpus: int = 2) -> None:
        self.registers = [
            {spec.source: 0 for spec in LAYOUTS[ARCH_X86_64]} | {"rip": 0x1000 + i, "cr0": 0x80000011, "efer": 0x500}
            for i in range(vcpus)
        ]
        self.memory = bytearray(MEMORY_SIZE)
        self.breakpoints: set[tuple[BreakKind, int, int]] = set()
        self.resumes: list[tuple[ResumeAction, int]] = []
        self.stops: queue.Queue[StopEvent] = queue.Queue()
        self.next_stop: StopEvent | None = StopEvent(vcpu=0)  # queued on every resume
        self.interrupts = 0
        self.detached = 0
        self.killed = 0
        self.attached = 0
        self.commands: list[str] = []

    def vcpu_count(self) -> int:
        return len(self.registers)

    def attach(self) -> StopEvent:
        self.attached += 1
        return StopEvent(vcpu=0)

    def read_registers(self, vcpu: int) -> dict[str, int]:
        return dict(self.registers[vcpu])

    def write_registers(self, vcpu: int, values: dict[str, int]) -> None:
        self.registers[vcpu].update(values)

    def _offset(self, address: int, length: int) -> int:
        if address < MEMORY_BASE or address + length > MEMORY_BASE + MEMORY_SIZE:
            raise GdbTargetError(f"{address:#x} is not mapped", 14)
        return address - MEMORY_BASE

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        return bytes(self.memory[offset : offset + length])

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.memory[offset : offset + len(data)] = data

    def insert_breakpoint(self, kind: BreakKind, address: int, length: int) -> None:
        if kind is not BreakKind.SOFTWARE:
            if sum(1 for k, _, _ in self.breakpoints if k is not BreakKind.SOFTWARE) >= DEBUG_REGISTER_SLOTS:
                raise GdbTargetError("all four debug registers are in use", 28)
        self.breakpoints.add((kind, address, length))

    def remove_breakpoint(self, kind: BreakKind, address: int, length: int) -> None:
        self.breakpoints.discard((kind, address, length))

    def remove_all_breakpoints(self) -> None:
        self.breakpoints.clear()

    def resume(self, action: ResumeAction, vcpu: int) -> None:
        self.resumes.append((action, vcpu))
        if self.next_stop is not None:
            self.stops.put(self.next_stop)

    def interrupt(self) -> None:
        self.interrupts += 1
        self.stops.put(StopEvent(vcpu=1, signal=2))

    def wait_for_stop(self, timeout: float) -> StopEvent | None:
        try:
            return self.stops.get(timeout=timeout)
        except queue.Empty:
            return None

    def detach(self) -> None:
        self.breakpoints.clear()
        self.detached += 1

    def kill(self) -> None:
        self.killed += 1

    def monitor(self, command: str) -> str:
        self.commands.append(command)
        if command == "fail":
            raise GdbTargetError("no such command")
        return "" if command == "quiet" else f"ran {command}"


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def stub(target: FakeTarget) -> GdbStub:
    stub = GdbStub(target)
    stub.attach()
    return stub


def test_connect_sequence_as_gdb_13_sends_it(stub: GdbStub) -> None:
    # Recorded from `gdb -batch -ex 'target remote ...'` (Debian gdb 13.1, `set debug remote 1`).
    supported = stub.handle(
        b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;fork-events+;vfork-events+;exec-events+;"
        b"vContSupported+;QThreadEvents+;no-resumed+;memory-tagging+;xmlRegisters=i386"
    )
    assert supported is not None
    assert b"PacketSize=4000" in supported and b"qXfer:features:read+" in supported
    assert stub.handle(b"vMustReplyEmpty") == b""
    assert stub.handle(b"QStartNoAckMode") == b"OK" and stub.no_ack
    assert stub.handle(b"Hg0") == b"OK"
    first = stub.handle(b"qXfer:features:read:target.xml:0,1000")
    assert first is not None and first.startswith(b"m<?xml")
    rest = stub.handle(b"qXfer:features:read:target.xml:1000,1000")
    assert rest is not None and rest.startswith(b"l")
    document = decode_payload(first[1:] + rest[1:])
    assert document is not None and document.endswith(b"</target>\n")
    assert stub.handle(b"qTStatus") == b""
    assert stub.handle(b"?") == b"T05thread:1;"
    assert stub.handle(b"qfThreadInfo") == b"m1,2"
    assert stub.handle(b"qsThreadInfo") == b"l"
    assert stub.handle(b"qAttached") == b"1"
    assert stub.handle(b"Hc-1") == b"OK"
    assert stub.handle(b"qC") == b"QC1"
    assert stub.handle(b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()


def test_g_packet_layout_follows_the_target_description(stub: GdbStub, target: FakeTarget) -> None:
    target.registers[0].update(rax=0x1122334455667788, rip=0xFFFFFFFF81000000, cs=0x10, efer=0xD01)
    reply = stub.handle(b"g")
    assert reply is not None
    layout = LAYOUTS[ARCH_X86_64]
    assert len(reply) == 2 * sum(spec.size for spec in layout)
    assert reply[:16] == b"8877665544332211"
    offsets = {}
    position = 0
    for index, spec in enumerate(layout):
        offsets[spec.name] = (index, position)
        position += 2 * spec.size
    index, at = offsets["rip"]
    assert reply[at : at + 16] == b"00000081ffffffff"
    assert stub.handle(b"p%x" % offsets["efer"][0]) == b"010d000000000000"
    assert stub.handle(b"p%x" % offsets["cs"][0]) == b"10000000"


def test_i386_layout_reads_the_low_halves(target: FakeTarget) -> None:
    stub = GdbStub(target, ARCH_I386)
    stub.attach()
    target.registers[0].update(rax=0x1122334455667788, rcx=0xAABBCCDD)
    reply = stub.handle(b"g")
    assert reply is not None
    assert reply[:16] == b"88776655ddccbbaa"  # eax, then ecx (gdb's i386 order)


def test_register_writes_change_only_what_gdb_changed(stub: GdbStub, target: FakeTarget) -> None:
    reply = stub.handle(b"g")
    assert reply is not None
    changed = b"0100000000000000" + reply[16:]
    recorded: list[dict[str, int]] = []
    original = target.write_registers

    def record(vcpu: int, values: dict[str, int]) -> None:
        recorded.append(values)
        original(vcpu, values)

    target.write_registers = record  # type: ignore[method-assign]
    assert stub.handle(b"G" + changed) == b"OK"
    assert recorded == [{"rax": 1}]
    assert stub.handle(b"P10=0020000000000000") == b"OK"  # register 0x10 is rip
    assert target.registers[0]["rip"] == 0x2000
    assert stub.handle(b"P10=00") == b"E16"  # wrong size
    assert stub.handle(b"P999=00") == b"E16"
    assert stub.handle(b"G" + changed + b"00") == b"E16"


def test_memory_read_write_and_errors(stub: GdbStub, target: FakeTarget) -> None:
    assert stub.handle(b"M1000,4:deadbeef") == b"OK"
    assert stub.handle(b"m1000,4") == b"deadbeef"
    assert stub.handle(b"X1004,3:}#*") == b"OK"  # the decoder already undid gdb's escapes
    assert target.memory[4:7] == b"}#*"
    assert stub.handle(b"X1004,0:") == b"OK"  # gdb's probe for X support
    assert stub.handle(b"m0,4") == b"E0e"  # EFAULT: not mapped
    assert stub.handle(b"M1000,4:dead") == b"E16"
    assert stub.handle(b"mzz,4") == b"E16"
    assert stub.handle(b"M1000,2:zzzz") == b"E16"


def test_continue_step_and_stop_replies(stub: GdbStub, target: FakeTarget) -> None:
    stub.handle(b"qSupported:swbreak+;hwbreak+")
    assert stub.handle(b"vCont?") == b"vCont;c;C;s;S"
    target.next_stop = StopEvent(vcpu=1, software_breakpoint=True)
    assert stub.handle(b"vCont;c") is None and stub.running
    assert stub.poll_stop(1.0) == b"T05thread:2;swbreak:;"
    assert not stub.running and target.resumes[-1] == (ResumeAction.CONTINUE, 0)
    target.next_stop = StopEvent(vcpu=1, watch=BreakKind.WRITE_WATCH, watch_address=0x1100)
    assert stub.handle(b"vCont;s:2;c") is None
    assert target.resumes[-1] == (ResumeAction.STEP, 1)
    assert stub.poll_stop(1.0) == b"T05thread:2;watch:1100;"
    target.next_stop = StopEvent(vcpu=0, watch=BreakKind.READ_WATCH, watch_address=0x1104)
    assert stub.handle(b"s") is None
    assert target.resumes[-1] == (ResumeAction.STEP, 1)  # `s` steps the thread that stopped
    assert stub.poll_stop(1.0) == b"T05thread:1;rwatch:1104;"
    target.next_stop = StopEvent(vcpu=0, hardware_breakpoint=True)
    assert stub.handle(b"c2000") is None
    assert target.registers[0]["rip"] == 0x2000
    assert stub.poll_stop(1.0) == b"T05thread:1;hwbreak:;"
    assert stub.handle(b"?") == b"T05thread:1;hwbreak:;"


def test_stop_reasons_are_only_reported_when_gdb_asked_for_them(stub: GdbStub, target: FakeTarget) -> None:
    stub.handle(b"qSupported:multiprocess+")
    target.next_stop = StopEvent(vcpu=0, software_breakpoint=True)
    stub.handle(b"c")
    assert stub.poll_stop(1.0) == b"T05thread:1;"


def test_interrupt_stops_with_sigint(stub: GdbStub, target: FakeTarget) -> None:
    target.next_stop = None
    stub.handle(b"vCont;c")
    assert stub.poll_stop(0.01) is None
    stub.interrupt()
    stub.interrupt()  # a second Ctrl-C while the first is pending changes nothing
    assert target.interrupts == 1
    assert stub.poll_stop(1.0) == b"T02thread:2;"
    stub.interrupt()  # not running: ignored
    assert target.interrupts == 1


def test_the_end_of_the_run_is_an_exit_reply(stub: GdbStub, target: FakeTarget) -> None:
    target.next_stop = StopEvent(exit_code=42, notice="pyhv: debug-exit 42")
    stub.handle(b"c")
    assert stub.poll_stop(1.0) == b"W2a"
    assert stub.pending_output == [b"O" + b"pyhv: debug-exit 42\n".hex().encode()]
    assert stub.handle(b"c") == b"W2a"  # nothing left to run
    assert len(target.resumes) == 1


def test_breakpoint_packets(stub: GdbStub, target: FakeTarget) -> None:
    assert stub.handle(b"Z0,1020,1") == b"OK"
    assert stub.handle(b"Z1,1010,1") == b"OK"
    assert stub.handle(b"Z2,1100,4") == b"OK"
    assert stub.handle(b"Z3,1104,4") == b"OK"
    assert stub.handle(b"Z4,1108,8;X1,0") == b"OK"  # a condition list after ';' is ignored
    assert stub.handle(b"Z1,1030,1") == b"E1c"  # DR0-DR3 are all taken: ENOSPC
    assert (BreakKind.READ_WATCH, 0x1104, 4) in target.breakpoints
    assert stub.handle(b"z3,1104,4") == b"OK"
    assert (BreakKind.READ_WATCH, 0x1104, 4) not in target.breakpoints
    assert stub.handle(b"Z9,1000,1") == b""  # unknown type: not supported
    assert stub.handle(b"Z0,1000") == b"E16"


def test_threads(stub: GdbStub, target: FakeTarget) -> None:
    assert stub.handle(b"T2") == b"OK"
    assert stub.handle(b"T3") == b"E16"
    assert stub.handle(b"Hg2") == b"OK"
    reply = stub.handle(b"g")
    assert reply is not None and reply[16 * 16 : 16 * 16 + 16] == b"0110000000000000"  # vCPU 1's rip
    assert stub.handle(b"Hg5") == b"E16"
    assert stub.handle(b"Hx1") == b"E16"
    assert stub.handle(b"H") == b"E16"


def test_monitor_commands(stub: GdbStub, target: FakeTarget) -> None:
    assert stub.handle(b"qRcmd," + b"exits".hex().encode()) == b"ran exits\n".hex().encode()
    assert stub.handle(b"qRcmd," + b"quiet".hex().encode()) == b"OK"
    assert stub.handle(b"qRcmd," + b"fail".hex().encode()) == b"error: no such command\n".hex().encode()
    assert stub.handle(b"qRcmd,zz") == b"E16"
    assert stub.handle(b"qRcmd,ff") == b"E16"  # not UTF-8
    assert target.commands == ["exits", "quiet", "fail"]


def test_detach_and_kill(stub: GdbStub, target: FakeTarget) -> None:
    stub.handle(b"Z0,1020,1")
    assert stub.handle(b"D") == b"OK"
    assert stub.detached and target.detached == 1 and not target.breakpoints
    stub.disconnected()  # the socket closing afterwards does not detach twice
    assert target.detached == 1
    other = GdbStub(target)
    assert other.handle(b"k") is None and target.killed == 1
    third = GdbStub(target)
    assert third.handle(b"vKill;1") == b"OK" and target.killed == 2


def test_qxfer_errors(stub: GdbStub) -> None:
    assert stub.handle(b"qXfer:features:read:other.xml:0,100") == b"E00"
    assert stub.handle(b"qXfer:memory-map:read::0,100") == b""
    assert stub.handle(b"qXfer:features:read:target.xml") == b"E16"
    assert stub.handle(b"qXfer:features:read:target.xml:99999,100") == b"l"


def test_unknown_and_malformed_packets_never_raise(stub: GdbStub) -> None:
    import random

    rng = random.Random(3)
    for payload in (b"", b"!", b"vFile:open:", b"qFoo", b"Qbar", b"vCont;x", b"vCont", b"vCont;", b"Cxx;"):
        assert isinstance(stub.handle(payload), (bytes, type(None)))
    for _ in range(3000):
        payload = bytes(rng.choice(b"gGpPmMXcsCSHTZzqQv?,:;=-0123456789abcdefx") for _ in range(rng.randrange(1, 24)))
        if payload[:1] in (b"D", b"k"):
            continue
        reply = stub.handle(payload)
        assert reply is None or isinstance(reply, bytes)
        stub.running = False


def test_a_target_bug_becomes_an_error_reply(stub: GdbStub, target: FakeTarget) -> None:
    def broken(vcpu: int) -> dict[str, int]:
        raise RuntimeError("bug")

    target.read_registers = broken  # type: ignore[method-assign]
    assert stub.handle(b"g") == b"E16"


def test_target_descriptions_name_what_gdb_requires() -> None:
    from hypervisor.debug.gdb.target_xml import target_xml

    for arch, pc in ((ARCH_X86_64, b"rip"), (ARCH_I386, b"eip")):
        document = target_xml(arch)
        for name in (pc, b"eflags", b"cs", b"gs", b"st7", b"fop", b"xmm0", b"mxcsr", b"fs_base", b"cr0", b"cr3",
                     b"cr4", b"cr8", b"efer", b"cs_base"):  # fmt: skip
            assert b'name="%s"' % name in document
        assert b"org.gnu.gdb.i386.core" in document and b"org.pyhv.gdb.x86.sys" in document
    assert b"org.gnu.gdb.i386.segments" in target_xml(ARCH_X86_64)
