"""The gdb listener: `tcp:HOST:PORT` or `unix:PATH`, one client at a time, on its own threads.

Each connection runs `GdbStub` over a `PacketDecoder`; the socket thread only waits on the
socket and on the target's stop queue, so the vCPU threads never wait for gdb. A second client
while one is attached gets one `E.` error packet and is closed (gdb shows the text). A client
that drops its connection is treated as a detach: breakpoints removed, the guest resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.debug.gdb.packets import EventKind, PacketDecoder, encode_packet
from hypervisor.debug.gdb.stub import EINVAL, GdbStub, error_reply
from hypervisor.debug.gdb.target import GdbTarget
from hypervisor.debug.gdb.target_xml import ARCH_X86_64
from hypervisor.errors import ConfigError

if TYPE_CHECKING:
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

RECEIVE_SIZE = 4096
IDLE_POLL_SECONDS = 0.25  # how often an idle session checks whether the server is closing
STOP_POLL_SECONDS = 0.02  # while the guest runs: socket and stop queue take turns this often
ACCEPT_POLL_SECONDS = 0.25
SEND_TIMEOUT_SECONDS = 10.0  # a client that stops reading is dropped, never waited for forever
BUSY_REPLY = b"E.another gdb is already attached to this pyhv machine"


@dataclass(frozen=True)
class GdbAddress:
    """Where the stub listens: `family` is "tcp" (host, port) or "unix" (path)."""

    family: str
    host: str = ""
    port: int = 0
    path: str = ""

    def describe(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.family == "tcp" else f"unix:{self.path}"


def parse_gdb_address(spec: str) -> GdbAddress:
    """`tcp:HOST:PORT`, `tcp::PORT` / `:PORT` (localhost) or `unix:PATH`; ConfigError otherwise."""
    family, separator, rest = spec.partition(":")
    if family == "unix" and separator:
        if not rest or "\0" in rest:
            raise ConfigError(f"--gdb {spec!r}: unix: wants a socket path")
        return GdbAddress("unix", path=rest)
    if family in ("tcp", "") and separator:
        host, separator, port_text = rest.rpartition(":")
        if not separator:
            host, port_text = "", rest
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text, 10)
        except ValueError:
            raise ConfigError(f"--gdb {spec!r}: the port {port_text!r} is not a number") from None
        if not 0 <= port <= 0xFFFF:
            raise ConfigError(f"--gdb {spec!r}: the port must be 0-65535")
        return GdbAddress("tcp", host=host, port=port)
    raise ConfigError(f"--gdb {spec!r}: use tcp:HOST:PORT or unix:PATH")


class GdbServer:
    """Listens at `address`; every accepted client debugs `target` through a fresh GdbStub."""

    def __init__(self, target: GdbTarget, address: GdbAddress, arch: str = ARCH_X86_64) -> None:
        self.target = target
        self.address = address
        self.arch = arch
        self._listener: socket.socket | None = None
        self._closing = threading.Event()
        self._session_lock = threading.Lock()
        self._session: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.sessions = 0  # clients served so far (tests, logs)
        self.client_attached = threading.Event()  # set while a client is attached
        self.on_session_end: Callable[[], None] | None = None
        self._stub: GdbStub | None = None  # the attached session's stub

    # -- lifetime -------------------------------------------------------------------------------

    def start(self) -> None:
        """Binds and listens (ConfigError if the address cannot be used), then accepts in a thread."""
        self._listener = self._bind()
        accept = threading.Thread(target=self._accept_loop, name="gdb-accept", daemon=True)
        self._threads.append(accept)
        accept.start()
        log.info("gdb stub listening on %s", self.describe())

    def describe(self) -> str:
        if self._listener is not None and self.address.family == "tcp":
            host, port = self._listener.getsockname()[:2]
            return f"tcp:{host}:{port}"
        return self.address.describe()

    @property
    def busy(self) -> bool:
        """True while a client's connection is open (attached or not yet)."""
        with self._session_lock:
            return self._session is not None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with tcp:HOST:0)."""
        assert self._listener is not None and self.address.family == "tcp"
        return int(self._listener.getsockname()[1])

    def close(self, grace: float = 1.0) -> None:
        """Stops listening and ends the session, after giving a running one up to `grace`
        seconds to send its last stop reply (the guest's exit, as gdb's `W`)."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            stub = self._stub
            if stub is None or not stub.running or stub.detached:
                break
            time.sleep(STOP_POLL_SECONDS)
        self._closing.set()
        # The stub is no longer `running` as soon as a session has taken its last stop reply,
        # before that session has sent it: let the session leave its loop (it looks at
        # `closing` at least every IDLE_POLL_SECONDS) before its socket is shut down under it,
        # or gdb sees "Remote connection closed" instead of the guest's exit.
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(2 * IDLE_POLL_SECONDS)
        with self._session_lock:
            session = self._session
        if session is not None:
            with contextlib.suppress(OSError):
                session.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(2.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.address.family == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.address.path)

    def _bind(self) -> socket.socket:
        address = self.address
        if address.family == "unix":
            self._remove_stale_socket(address.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address.path
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            target = (address.host, address.port)
        try:
            listener.bind(target)  # type: ignore[arg-type]
            listener.listen(2)
        except (OSError, OverflowError) as error:
            listener.close()
            detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ConfigError(f"--gdb {address.describe()}: cannot listen there: {detail}") from error
        return listener

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        """A socket file left by a previous run is removed; anything else at `path` is refused."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise ConfigError(f"--gdb unix:{path}: {error.strerror}") from error
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"--gdb unix:{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise ConfigError(f"--gdb unix:{path}: another program is listening there")

    # -- accepting --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select([listener], [], [], ACCEPT_POLL_SECONDS)
                if not readable:
                    continue
                client, peer = listener.accept()
            except (OSError, ValueError):
                if self._closing.is_set():
                    return
                log.exception("gdb: accept failed")
                continue
            with self._session_lock:
                busy = self._session is not None
                if not busy:
                    self._session = client
            if busy:
                log.warning("gdb: refused a second client (%s) while one is attached", peer or "unix socket")
                self._refuse(client)
                continue
            session = threading.Thread(target=self._serve, args=(client,), name="gdb-session", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [session]
            session.start()

    @staticmethod
    def _refuse(client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.settimeout(1.0)
            client.sendall(encode_packet(BUSY_REPLY))
        client.close()

    # -- one session ---------------------------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        self.sessions += 1
        stub = GdbStub(self.target, self.arch)
        self._stub = stub
        log.info("gdb: client connected")
        try:
            _Session(client, stub, self._closing, self.client_attached).run()
        except Exception:  # never let a session bug reach the guest: detach and carry on
            log.exception("gdb: session failed")
        finally:
            try:
                if stub.attached:
                    stub.disconnected()
            except Exception:
                log.exception("gdb: detaching after the session failed")
            self.client_attached.clear()
            self._stub = None
            with self._session_lock:
                self._session = None
            client.close()
            log.info("gdb: client detached")
            if self.on_session_end is not None:
                self.on_session_end()


class _Session:
    """The byte pump between one socket and one stub: acks, resends, interrupts, stop replies."""

    def __init__(
        self, client: socket.socket, stub: GdbStub, closing: threading.Event, attached: threading.Event
    ) -> None:
        self.client = client
        self.attached = attached
        client.settimeout(SEND_TIMEOUT_SECONDS)
        self.stub = stub
        self.closing = closing
        self.decoder = PacketDecoder()
        self.last_sent = b""

    def run(self) -> None:
        client = self.client
        while not self.closing.is_set() and not self.stub.detached:
            timeout = STOP_POLL_SECONDS if self.stub.running else IDLE_POLL_SECONDS
            readable, _, _ = select.select([client], [], [], timeout)
            if readable:
                try:
                    data = client.recv(RECEIVE_SIZE)
                except OSError:
                    return
                if not data:
                    return  # the client hung up
                if not self._receive(data):
                    return
            if self.stub.running:
                reply = self.stub.poll_stop(STOP_POLL_SECONDS)
                if reply is None:
                    continue
                output, self.stub.pending_output = self.stub.pending_output, []
                if not all(self._send_packet(packet) for packet in [*output, reply]):
                    return

    def _receive(self, data: bytes) -> bool:
        """Handles what arrived; False when the connection broke while answering."""
        for event in self.decoder.feed(data):
            if not self.stub.attached and event.kind in (EventKind.PACKET, EventKind.INTERRUPT):
                # Stop the guest only once the client speaks RSP: a port probe that connects
                # and leaves must not pause the machine.
                self.stub.attach()
                self.attached.set()
            if event.kind is EventKind.PACKET:
                acking = not self.stub.no_ack
                if acking and not self._send(b"+"):
                    return False
                reply = self.stub.handle(event.payload)
                if reply is not None and not self._send_packet(reply):
                    return False
                if self.stub.detached:
                    return True
            elif event.kind is EventKind.INTERRUPT:
                self.stub.interrupt()
            elif event.kind is EventKind.NACK:
                if not self.stub.no_ack and self.last_sent and not self._send(self.last_sent):
                    return False
            elif event.kind is EventKind.BAD_PACKET:
                log.debug("gdb: bad packet: %s", event.reason)
                if self.stub.no_ack:
                    if not event.resend and not self._send_packet(error_reply(EINVAL)):
                        return False
                elif event.resend:
                    if not self._send(b"-"):
                        return False
                elif not (self._send(b"+") and self._send_packet(error_reply(EINVAL))):
                    return False
        return True

    def _send_packet(self, payload: bytes) -> bool:
        self.last_sent = encode_packet(payload)
        return self._send(self.last_sent)

    def _send(self, data: bytes) -> bool:
        try:
            self.client.sendall(data)
        except OSError:
            return False
        return True


def serve_machine(machine: Machine, spec: str, arch: str = ARCH_X86_64) -> GdbServer:
    """`pyhv run --gdb SPEC`: a listening stub for `machine` (start the machine paused after)."""
    from hypervisor.debug.gdb.machine_target import MachineTarget

    address = parse_gdb_address(spec)
    target = MachineTarget(machine)
    server = GdbServer(target, address, arch)
    server.start()
    return server
