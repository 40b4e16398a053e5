"""The gdb listener over real sockets with a fake target: one client, refusals, drops, gdb itself."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.debug.gdb.packets import EventKind, PacketDecoder, encode_packet
from hypervisor.debug.gdb.server import GdbAddress, GdbServer, parse_gdb_address
from hypervisor.errors import ConfigError
from tests.unit.test_gdb_stub import FakeTarget

pytestmark = pytest.mark.timeout(60)


class Client:
    """A minimal RSP client: sends packets, collects acks and replies."""

    def __init__(self, connection: socket.socket) -> None:
        self.sock = connection
        self.sock.settimeout(5)
        self.decoder = PacketDecoder()
        self.pending: list[tuple[EventKind, bytes]] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self) -> tuple[EventKind, bytes]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.pending += [(event.kind, event.payload) for event in self.decoder.feed(data)]
        return self.pending.pop(0)

    def request(self, payload: bytes) -> bytes:
        self.send_raw(encode_packet(payload))
        assert self.next_event() == (EventKind.ACK, b"")
        kind, reply = self.next_event()
        assert kind is EventKind.PACKET
        self.send_raw(b"+")
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def server(target: FakeTarget) -> Iterator[GdbServer]:
    server = GdbServer(target, GdbAddress("tcp", host="127.0.0.1", port=0))
    server.start()
    yield server
    server.close()


def connect(server: GdbServer) -> Client:
    return Client(socket.create_connection(("127.0.0.1", server.port)))


def wait_until(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_address_specs() -> None:
    assert parse_gdb_address("tcp:0.0.0.0:1234") == GdbAddress("tcp", host="0.0.0.0", port=1234)
    assert parse_gdb_address("tcp::1234") == GdbAddress("tcp", host="127.0.0.1", port=1234)
    assert parse_gdb_address(":1234") == GdbAddress("tcp", host="127.0.0.1", port=1234)
    assert parse_gdb_address("tcp:[::1]:99") == GdbAddress("tcp", host="::1", port=99)
    assert parse_gdb_address("unix:/tmp/x.sock") == GdbAddress("unix", path="/tmp/x.sock")
    for bad in ("tcp:host:port", "tcp:1.2.3.4:70000", "unix:", "serial:/dev/ttyS0", "1234", ""):
        with pytest.raises(ConfigError):
            parse_gdb_address(bad)


def test_packets_acks_and_a_resend_request(server: GdbServer, target: FakeTarget) -> None:
    client = connect(server)
    assert client.request(b"?") == b"T05thread:1;"
    client.send_raw(b"$g#00")  # wrong checksum
    assert client.next_event() == (EventKind.NACK, b"")
    client.send_raw(b"garbage\x7f")  # ignored
    assert client.request(b"m1000,2") == b"0000"
    assert client.request(b"QStartNoAckMode") == b"OK"
    client.send_raw(encode_packet(b"qC"))
    assert client.next_event() == (EventKind.PACKET, b"QC1")  # no ack any more
    client.send_raw(b"$" + b"0" * 0x5000 + b"#00")  # overlong
    assert client.next_event() == (EventKind.PACKET, b"E16")
    client.close()


def test_interrupt_while_running(server: GdbServer, target: FakeTarget) -> None:
    target.next_stop = None
    client = connect(server)
    client.send_raw(encode_packet(b"vCont;c"))
    assert client.next_event() == (EventKind.ACK, b"")
    time.sleep(0.1)
    client.send_raw(b"\x03")
    assert client.next_event() == (EventKind.PACKET, b"T02thread:2;")
    client.close()


def test_a_second_client_is_refused_while_the_first_is_attached(server: GdbServer, target: FakeTarget) -> None:
    first = connect(server)
    assert first.request(b"?") == b"T05thread:1;"
    second = connect(server)
    kind, reply = second.next_event()
    assert kind is EventKind.PACKET and reply.startswith(b"E.another gdb is already attached")
    with pytest.raises((EOFError, ConnectionResetError)):
        second.next_event()
    assert first.request(b"qC") == b"QC1"  # the first session is untouched
    assert target.attached == 1
    first.close()


def test_a_dropped_connection_detaches_and_the_next_client_can_attach(server: GdbServer, target: FakeTarget) -> None:
    client = connect(server)
    assert client.request(b"Z0,1020,1") == b"OK"
    client.send_raw(b"$m10")  # hang up in the middle of a packet
    client.close()
    assert wait_until(lambda: target.detached == 1)
    assert not target.breakpoints
    again = connect(server)
    assert again.request(b"?") == b"T05thread:1;"
    assert target.attached == 2
    assert again.request(b"D") == b"OK"
    assert wait_until(lambda: target.detached == 2)
    again.close()


def test_unix_socket_and_stale_files(tmp_path: Path, target: FakeTarget) -> None:
    path = tmp_path / "gdb.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a killed run leaves it
    server = GdbServer(target, GdbAddress("unix", path=str(path)))
    server.start()
    try:
        with pytest.raises(ConfigError, match="another program is listening"):
            GdbServer(target, GdbAddress("unix", path=str(path))).start()
        assert wait_until(lambda: server.sessions == 1 and not server.busy)  # the probe came and went
        assert target.attached == 0  # a connection that sends nothing does not stop the guest
        client = Client(socket.socket(socket.AF_UNIX))
        client.sock.connect(str(path))
        assert client.request(b"qfThreadInfo") == b"m1,2"
        client.close()
    finally:
        server.close()
    assert not path.exists()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        GdbServer(target, GdbAddress("unix", path=str(regular))).start()


def test_an_address_in_use_is_a_config_error(server: GdbServer, target: FakeTarget) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        GdbServer(target, GdbAddress("tcp", host="127.0.0.1", port=server.port)).start()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (Debian package gdb)")
def test_real_gdb_against_the_fake_target(server: GdbServer, target: FakeTarget) -> None:
    target.memory[0:4] = b"\x90\x90\xeb\xfe"
    commands = [
        f"target remote 127.0.0.1:{server.port}",
        "info registers cr0 efer fs_base rip",
        "x/4xb 0x1000",
        "set {char}0x1000 = 0x55",
        "hbreak *0x1010",
        "break *0x1020",
        "watch *(int*)0x1100",
        "rwatch *(int*)0x1104",
        "awatch *(int*)0x1108",
        "info threads",
        "monitor hello",
        "detach",
    ]
    arguments = ["gdb", "-batch", "-nx"] + [item for command in commands for item in ("-ex", command)]
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert "cr0            0x80000011" in output
    assert "efer           0x500" in output
    assert "0x1000:\t0x90\t0x90\t0xeb\t0xfe" in output
    assert "Hardware assisted breakpoint 1 at 0x1010" in output
    assert "Hardware read watchpoint 4" in output and "Hardware access (read/write) watchpoint 5" in output
    assert "Thread 2 (vCPU 1)" in output
    assert "ran hello" in output
    assert "detached" in output
    assert target.memory[0] == 0x55
    assert wait_until(lambda: target.detached == 1)


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (Debian package gdb)")
def test_real_gdb_accepts_the_i386_description(target: FakeTarget) -> None:
    from hypervisor.debug.gdb.target_xml import ARCH_I386

    target.registers[0].update(rax=0xAABBCCDD11223344, rip=0x1234, cr0=0x11)
    server = GdbServer(target, GdbAddress("tcp", host="127.0.0.1", port=0), ARCH_I386)
    server.start()
    try:
        commands = [f"target remote 127.0.0.1:{server.port}", "show architecture",
                    "info registers eax eip cr0 efer fs_base", "p $xmm7", "detach"]  # fmt: skip
        arguments = ["gdb", "-batch", "-nx"] + [item for command in commands for item in ("-ex", command)]
        output = subprocess.run(arguments, capture_output=True, text=True, timeout=30).stdout
    finally:
        server.close()
    assert "i386" in output and "x86-64" not in output
    assert "eax            0x11223344" in output and "eip            0x1234" in output
    assert "cr0            0x11" in output and "efer           0x500" in output
    assert "v4_float" in output
