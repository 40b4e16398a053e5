"""Debian's gdb in batch mode against the gdb stub and the gdb_target test guest on real KVM.

The guest (tests/guests/gdb_target.S) loops `count` times at fixed addresses: 0x1210 (software
breakpoint site), 0x1220 (writes COUNTER at 0x1800), 0x1230 (reads SOURCE at 0x1808, the
hardware breakpoint site), then writes its exit code to the debug-exit port.

On this project's kvm_pvm hosts (shared/PLATFORM.md) guest code at CPL0 runs in KVM's
instruction emulator, which reports single steps, int3 (as an emulation failure the runner
turns into a #BP trap) and instruction breakpoints in DR0-DR3, but never data breakpoints; at
CPL3 the code runs natively and #DB/#BP go to the guest instead of to KVM_EXIT_DEBUG. Those
cases are skipped there with that reason and run on hardware virtualization.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.debug.gdb.packets import EventKind, PacketDecoder, encode_packet
from hypervisor.debug.gdb.server import GdbServer, serve_machine
from hypervisor.machine import Machine
from hypervisor.outcome import OutcomeKind
from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(90)]

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian package gdb)")
PVM_HOST = os.path.exists("/sys/module/kvm_pvm")
MODE_USER, MODE_KERNEL = 0, 1
LOOP_TOP, READ_SITE, COUNTER, SOURCE = 0x1210, 0x1230, 0x1800, 0x1808
EXIT_CODE = 7
FOREVER = 1 << 60


def skip_on_pvm(what: str, mode: int) -> None:
    if not PVM_HOST:
        return
    if mode == MODE_USER:
        pytest.skip(f"kvm_pvm delivers {what} from CPL3 guest code to the guest, not as KVM_EXIT_DEBUG")
    pytest.skip(f"kvm_pvm's instruction emulator (guest CPL0) does not raise {what}")


@pytest.fixture
def make_machine(guest_binary) -> Iterator:  # type: ignore[no-untyped-def]
    created: list[tuple[Machine, GdbServer]] = []

    def make(mode: int = MODE_KERNEL, count: int = 3, paused: bool = True) -> tuple[Machine, GdbServer]:
        machine = Machine(16, console=MemoryConsole())
        image = with_parameters(guest_binary("gdb_target").read_bytes(), exit_code=EXIT_CODE, mode=mode, count=count)
        machine.load_raw_bytes(image, GUEST_BASE, "gdb_target")
        server = serve_machine(machine, "tcp:127.0.0.1:0")
        created.append((machine, server))
        machine.start(paused=paused)
        return machine, server

    yield make
    for machine, server in created:
        server.close(grace=0)
        machine.close()


def run_gdb(server: GdbServer, *commands: str, timeout: float = 60) -> str:
    arguments = [GDB or "gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{server.port}"]
    for command in commands:
        arguments += ["-ex", command]
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout)
    return result.stdout + result.stderr


class RspClient:
    """A raw RSP client, for what gdb -batch cannot do (Ctrl-C, hanging up mid-session)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = PacketDecoder()
        self.pending: list[tuple[EventKind, bytes]] = []

    def event(self) -> tuple[EventKind, bytes]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.pending += [(e.kind, e.payload) for e in self.decoder.feed(data)]
        return self.pending.pop(0)

    def reply(self) -> bytes:
        while True:
            kind, payload = self.event()
            if kind is EventKind.PACKET:
                return payload

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(encode_packet(payload))
        return self.reply()

    def register(self, number: int) -> int:
        return int.from_bytes(bytes.fromhex(self.request(b"p%x" % number).decode()), "little")


@needs_gdb
def test_gdb_session_at_cpl0(make_machine) -> None:  # type: ignore[no-untyped-def]
    machine, server = make_machine(MODE_KERNEL)
    output = run_gdb(
        server,
        "info registers rip cr0 efer",
        "x/4xb 0x1000",
        f"break *{LOOP_TOP:#x}",
        "continue",
        "info registers rip rcx cr0 cr3 efer cs fs_base",
        f"x/3xb {LOOP_TOP:#x}",
        f"hbreak *{READ_SITE:#x}",
        "continue",
        "print $rcx",
        f"set *(long*){SOURCE:#x} = 0x55",
        "stepi",
        "print/x $pc",
        "print/x $rbx",
        "continue",
        "print $rcx",
        "delete",
        "monitor exits",
        "continue",
    )
    # Stopped before the first instruction: real mode, paging off.
    assert "rip            0x1000" in output and "cr0            0x10 " in output
    assert "0x1000:\t0xeb\t0x0e\t0x07\t0x01" in output  # jmp, then the parameter block
    assert f"Breakpoint 1, 0x{LOOP_TOP:016x} in ?? ()" in output
    # At the breakpoint: long mode (PE|PG, LME|LMA), the kernel code segment.
    assert "cr0            0x80000011" in output and "efer           0x500" in output
    assert "cr3            0x8000" in output and "cs             0x8 " in output
    assert f"0x{LOOP_TOP:x}:\t0x48\t0xff\t0xc1" in output  # the original bytes, not the int3
    assert f"Breakpoint 2, 0x{READ_SITE:016x} in ?? ()" in output
    assert "$1 = 1" in output
    assert "$2 = 0x1238" in output and "$3 = 0x55" in output  # stepped over the load of the new value
    assert "Breakpoint 1, " in output.split("$3 = 0x55", 1)[1] and "$4 = 1" in output  # hit again
    assert "DEBUG" in output  # monitor exits: the debug exits so far
    assert f"exited with code {EXIT_CODE:02o}" in output
    assert machine.wait(10).outcome.code == EXIT_CODE
    assert machine.memory.read(LOOP_TOP, 1) == b"\x48"  # the int3 is gone


@needs_gdb
@pytest.mark.parametrize("mode", [MODE_KERNEL, MODE_USER], ids=["cpl0", "cpl3"])
def test_watchpoints(make_machine, mode: int) -> None:  # type: ignore[no-untyped-def]
    skip_on_pvm("data breakpoints (DR7 R/W 01 and 11)", mode)
    machine, server = make_machine(mode)
    output = run_gdb(
        server,
        f"watch *(long*){COUNTER:#x}",
        f"rwatch *(long*){SOURCE:#x}",
        "continue",
        "continue",
        "delete",
        "continue",
    )
    assert "Hardware watchpoint 1" in output and "Old value = 0" in output and "New value = 1" in output
    assert "Hardware read watchpoint 2" in output and "Value = 1234605616436508552" in output
    assert f"exited with code {EXIT_CODE:02o}" in output


@needs_gdb
def test_breakpoints_and_steps_at_cpl3(make_machine) -> None:  # type: ignore[no-untyped-def]
    skip_on_pvm("#BP, #DB single steps and instruction breakpoints", MODE_USER)
    machine, server = make_machine(MODE_USER)
    output = run_gdb(server, f"break *{LOOP_TOP:#x}", f"hbreak *{READ_SITE:#x}", "continue", "continue",
                     "stepi", "print/x $pc", "info registers cs", "delete", "continue")  # fmt: skip
    assert "Breakpoint 1, " in output and "Breakpoint 2, " in output
    assert "$1 = 0x1238" in output and "cs             0x23" in output
    assert f"exited with code {EXIT_CODE:02o}" in output


def test_attach_to_a_running_guest_and_interrupt_it(make_machine) -> None:  # type: ignore[no-untyped-def]
    machine, server = make_machine(MODE_KERNEL, count=FOREVER, paused=False)
    time.sleep(0.3)
    client = RspClient(server.port)
    assert client.request(b"?").startswith(b"T")  # attaching stopped it
    assert machine.paused
    rcx_register = 2  # rax, rbx, rcx
    first = client.register(rcx_register)
    client.sock.sendall(encode_packet(b"vCont;c"))
    time.sleep(0.3)
    client.sock.sendall(b"\x03")
    assert client.reply() == b"T02thread:1;"
    second = client.register(rcx_register)
    assert second > first  # it ran in between
    assert client.request(b"D") == b"OK"
    time.sleep(0.3)
    assert not machine.paused
    assert machine.pause(timeout=5)
    assert machine.vcpus[0].get_regs()["rcx"] > second  # it runs on without gdb
    machine.resume()


def test_a_dropped_connection_removes_breakpoints_and_resumes(make_machine) -> None:  # type: ignore[no-untyped-def]
    machine, server = make_machine(MODE_KERNEL)
    client = RspClient(server.port)
    assert client.request(b"Z0,%x,1" % LOOP_TOP) == b"OK"
    assert machine.memory.read(LOOP_TOP, 1) == b"\xcc"
    assert client.request(b"m%x,1" % LOOP_TOP) == b"48"  # reads show the original byte
    second = RspClient(server.port)  # refused while the first is attached
    assert second.reply().startswith(b"E.another gdb")
    client.sock.sendall(b"$m10")  # hang up in the middle of a packet
    client.sock.close()
    result = machine.wait(30)
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT and result.outcome.code == EXIT_CODE
    assert machine.memory.read(LOOP_TOP, 1) == b"\x48"


def test_bad_packets_do_not_disturb_the_guest(make_machine) -> None:  # type: ignore[no-untyped-def]
    machine, server = make_machine(MODE_KERNEL)
    client = RspClient(server.port)
    for junk in (b"$g#00", b"\x00\xff$$##", b"$" + b"x" * 0x5000 + b"#00", b"$Z0,0,1#" + b"%02x" % sum(b"Z0,0,1")):
        client.sock.sendall(junk)
    assert client.request(b"m%x,4" % COUNTER) == b"00000000"
    assert client.request(b"mffffffffffff0000,4") == b"E0e"  # not mapped
    client.sock.sendall(encode_packet(b"vCont;c"))
    assert until_stop(client) == ([f"pyhv: debug-exit {EXIT_CODE}\n"], b"W%02x" % EXIT_CODE)
    assert machine.wait(10).outcome.code == EXIT_CODE


@needs_gdb
def test_pyhv_run_gdb_option(guest_binary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("gdb_target").read_bytes(), exit_code=9, mode=MODE_KERNEL, count=3))
    path = tmp_path / "gdb.sock"
    command = [sys.executable, "-m", "hypervisor", "run", "--raw", f"{image}@0x1000", "--console", "none",
               "--gdb", f"unix:{path}", "--timeout", "60"]  # fmt: skip
    pyhv = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        commands = [f"target remote {path}", f"break *{LOOP_TOP:#x}", "continue", "delete", "continue"]
        arguments = [GDB or "gdb", "-batch", "-nx"] + [part for command in commands for part in ("-ex", command)]
        gdb = subprocess.run(arguments, capture_output=True, text=True, timeout=60)
        _, errors = pyhv.communicate(timeout=30)
    finally:
        pyhv.kill()
    assert "Breakpoint 1, " in gdb.stdout and "exited with code 011" in gdb.stdout
    assert f"waiting for gdb on unix:{path}" in errors
    assert pyhv.returncode == 9
    assert not path.exists()


def test_pyhv_run_rejects_a_bad_gdb_address(guest_binary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "guest.bin"
    image.write_bytes(guest_binary("gdb_target").read_bytes())
    for spec in ("serial:/dev/ttyS0", "tcp:localhost:99999"):
        command = [sys.executable, "-m", "hypervisor", "run", "--raw", f"{image}@0x1000", "--console", "none",
                   "--gdb", spec]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1 and "pyhv: error: --gdb" in result.stderr


def monitor(client: RspClient, command: str) -> str:
    reply = client.request(b"qRcmd," + command.encode().hex().encode())
    return "" if reply == b"OK" else bytes.fromhex(reply.decode()).decode()


def until_stop(client: RspClient) -> tuple[list[str], bytes]:
    """Console output (`O` packets) and then the stop reply."""
    output = []
    while True:
        reply = client.reply()
        if reply.startswith(b"O") and reply != b"OK":
            output.append(bytes.fromhex(reply[1:].decode()).decode())
        else:
            return output, reply


def test_monitor_commands_reach_the_exit_debugger(guest_binary) -> None:  # type: ignore[no-untyped-def]
    machine = Machine(16, console=MemoryConsole())
    machine.load_raw_bytes(guest_binary("long_mode").read_bytes(), GUEST_BASE, "long_mode")
    server = serve_machine(machine, "tcp:127.0.0.1:0")
    try:
        machine.start(paused=True)
        client = RspClient(server.port)
        assert "COM1" in monitor(client, "devices") and "debug-exit" in monitor(client, "devices")
        assert "exits by KVM reason" in monitor(client, "exits")
        assert monitor(client, "break-exit io port=0x3f8 write count>2").startswith("exit breakpoint 1")
        assert monitor(client, "trace on") == "tracing exits\n"
        client.sock.sendall(encode_packet(b"vCont;c"))
        output, reply = until_stop(client)
        assert reply == b"T05thread:1;"
        assert any("breakpoint 1" in line and "port=0x3f8" in line for line in output)
        assert "io out port=0x3f8" in monitor(client, "trace show")
        assert "(hits 3)" in monitor(client, "break-exit list")  # the third write stopped it
        assert monitor(client, "break-exit delete 1") == "deleted exit breakpoint 1\n"
        assert monitor(client, "trace off") == "exit trace off\n"
        assert monitor(client, "frobnicate").startswith("error: unknown monitor command")
        assert monitor(client, "break-exit io port=banana").startswith("error: break-exit")
        assert monitor(client, "help").startswith("pyhv monitor commands")
        client.sock.sendall(encode_packet(b"vCont;c"))
        output, reply = until_stop(client)
        assert reply == b"W00" and output == ["pyhv: debug-exit 0\n"]
        assert machine.wait(10).outcome.kind is OutcomeKind.DEBUG_EXIT
    finally:
        server.close(grace=0)
        machine.close()


@needs_gdb
def test_every_vcpu_is_a_thread(guest_binary) -> None:  # type: ignore[no-untyped-def]
    machine = Machine(16, cpus=2, console=MemoryConsole())
    image = with_parameters(guest_binary("gdb_target").read_bytes(), exit_code=EXIT_CODE, mode=MODE_KERNEL, count=3)
    machine.load_raw_bytes(image, GUEST_BASE, "gdb_target")
    server = serve_machine(machine, "tcp:127.0.0.1:0")
    server.target.step_idle_seconds = 0.5  # type: ignore[attr-defined]
    try:
        machine.start(paused=True)
        output = run_gdb(server, "info threads", "thread 2", "info registers rip cs", "stepi", "thread 1",
                         f"break *{LOOP_TOP:#x}", "continue", "delete", "continue")  # fmt: skip
    finally:
        server.close(grace=0)
        machine.close()
    assert "Thread 1 (vCPU 0)" in output and "Thread 2 (vCPU 1)" in output
    # vCPU 1 waits for the SIPI nobody sends, at the reset vector: its step ends with a notice.
    assert "rip            0xfff0" in output and "cs             0xf000" in output
    assert "pyhv: vCPU 1 did not finish the instruction in 0.5 s" in output
    assert "Thread 1 hit Breakpoint 1" in output and f"exited with code {EXIT_CODE:02o}" in output
