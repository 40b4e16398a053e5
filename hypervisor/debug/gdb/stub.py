"""The gdb command layer: one RSP payload in, at most one reply payload out, over a GdbTarget.

Packets follow the gdb docs, "Packets", "General Query Packets", "Stop Reply Packets" and
"Host I/O"-free all-stop mode: `?`, g/G, p/P, m/M/X, c/s/C/S, vCont, H, T, qSupported,
qfThreadInfo/qsThreadInfo, qC, qAttached, qThreadExtraInfo, qXfer:features:read, qRcmd
(`monitor`), Z0-Z4/z0-z4, D and k. Anything else gets the empty reply, which tells gdb the
packet is not supported. A malformed packet gets `E16` (EINVAL); the stub never raises.

The stub holds no socket: server.py frames its replies, and feeds it interrupts and the
target's stops while the guest runs (`poll_stop`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hypervisor.debug.gdb.packets import MAX_PACKET_SIZE, escape_binary
from hypervisor.debug.gdb.target import (
    WATCH_KEYWORDS,
    BreakKind,
    GdbTarget,
    GdbTargetError,
    ResumeAction,
    StopEvent,
)
from hypervisor.debug.gdb.target_xml import ARCH_X86_64, LAYOUTS, read_chunk, target_xml

log = logging.getLogger(__name__)

EINVAL = 0x16
EFAULT = 0x0E
SIGINT = 2
SIGTRAP = 5
# The largest memory read we answer in one `m` reply: two hex digits per byte must fit.
MAX_MEMORY_READ = MAX_PACKET_SIZE // 2 - 16
OK = b"OK"
EMPTY = b""


class PacketError(ValueError):
    """A packet whose arguments do not parse; answered with E16."""


def error_reply(errno: int) -> bytes:
    return b"E%02x" % (errno & 0xFF)


def _hex_int(text: bytes) -> int:
    try:
        return int(text, 16)
    except ValueError as error:
        raise PacketError(f"{text!r} is not a hex number") from error


def _hex_bytes(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as error:
        raise PacketError("bad hex data") from error


def _address_length(text: bytes) -> tuple[int, int]:
    address, separator, length = text.partition(b",")
    if not separator:
        raise PacketError("expected ADDR,LENGTH")
    return _hex_int(address), _hex_int(length)


class GdbStub:
    """One debugging session's state: selected threads, the last stop, whether acks are off."""

    def __init__(self, target: GdbTarget, arch: str = ARCH_X86_64) -> None:
        self.target = target
        self.arch = arch
        self.layout = LAYOUTS[arch]
        self.description = target_xml(arch)
        self.no_ack = False
        self.running = False
        self.attached = False  # `attach` ran: the target was stopped for this client
        self.detached = False  # D or k: the connection should close after the reply
        self.report_swbreak = False
        self.report_hwbreak = False
        self.general_vcpu = 0  # Hg: registers and memory
        self.resume_vcpu: int | None = None  # Hc: None means "all" / the stopped one
        self.last_stop = StopEvent(vcpu=0, signal=SIGTRAP)
        self._interrupt_pending = False
        # `O` packets (console output) to send before the next stop reply (gdb docs, "Stop Reply
        # Packets": O is allowed while the target runs).
        self.pending_output: list[bytes] = []
        self._handlers: dict[int, Callable[[bytes], bytes | None]] = {
            ord("?"): lambda _: self.stop_reply(self.last_stop),
            ord("g"): self._read_all_registers,
            ord("G"): self._write_all_registers,
            ord("p"): self._read_register,
            ord("P"): self._write_register,
            ord("m"): self._read_memory,
            ord("M"): self._write_memory_hex,
            ord("X"): self._write_memory_binary,
            ord("c"): lambda args: self._resume(ResumeAction.CONTINUE, args),
            ord("s"): lambda args: self._resume(ResumeAction.STEP, args),
            ord("C"): lambda args: self._resume(ResumeAction.CONTINUE, args.partition(b";")[2]),
            ord("S"): lambda args: self._resume(ResumeAction.STEP, args.partition(b";")[2]),
            ord("H"): self._select_thread,
            ord("T"): self._thread_alive,
            ord("Z"): lambda args: self._breakpoint(args, insert=True),
            ord("z"): lambda args: self._breakpoint(args, insert=False),
            ord("D"): self._detach,
            ord("k"): self._kill,
            ord("q"): self._query,
            ord("Q"): self._set,
            ord("v"): self._v_packet,
        }

    # -- entry points for the connection ------------------------------------------------------

    def attach(self) -> None:
        """A client connected: the target stops, and `?` will say where."""
        self.attached = True
        self.last_stop = self.target.attach()
        self.general_vcpu = self.last_stop.vcpu

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet, or None when there is none yet (the guest now runs)."""
        if not payload:
            return EMPTY
        handler = self._handlers.get(payload[0])
        if handler is None:
            return EMPTY
        try:
            return handler(payload[1:])
        except PacketError as error:
            log.debug("gdb: bad packet %r: %s", payload[:40], error)
            return error_reply(EINVAL)
        except GdbTargetError as error:
            log.debug("gdb: %r failed: %s", payload[:40], error)
            return error_reply(error.errno)
        except Exception:  # a bug of ours must not end the session or touch the guest
            log.exception("gdb: packet %r failed", payload[:40])
            return error_reply(EINVAL)

    def interrupt(self) -> None:
        """Ctrl-C from gdb: stop a running guest; the stop reply follows from poll_stop."""
        if self.running and not self._interrupt_pending:
            self._interrupt_pending = True
            self.target.interrupt()

    def poll_stop(self, timeout: float) -> bytes | None:
        """While running: the stop reply when the target stopped within `timeout`, else None."""
        if not self.running:
            return None
        stop = self.target.wait_for_stop(timeout)
        if stop is None:
            return None
        self.running = False
        if self._interrupt_pending and stop.signal == SIGTRAP and stop.watch is None and stop.exit_code is None:
            if not (stop.software_breakpoint or stop.hardware_breakpoint):
                stop = StopEvent(vcpu=stop.vcpu, signal=SIGINT, description="interrupted by gdb")
        self._interrupt_pending = False
        if stop.notice:
            self.pending_output.append(b"O" + (stop.notice.rstrip("\n") + "\n").encode("utf-8").hex().encode())
        self.last_stop = stop
        self.general_vcpu = stop.vcpu
        return self.stop_reply(stop)

    def disconnected(self) -> None:
        """The client went away without D or k: leave the guest running, breakpoints removed."""
        if not self.detached:
            self.detached = True
            self.running = False
            self.target.detach()

    # -- stop replies ---------------------------------------------------------------------------

    def stop_reply(self, stop: StopEvent) -> bytes:
        if stop.exit_code is not None:
            return b"W%02x" % (stop.exit_code & 0xFF)
        reply = b"T%02xthread:%x;" % (stop.signal & 0xFF, stop.vcpu + 1)
        if stop.watch is not None:
            reply += b"%s:%x;" % (WATCH_KEYWORDS[stop.watch].encode(), stop.watch_address)
        elif stop.software_breakpoint and self.report_swbreak:
            reply += b"swbreak:;"
        elif stop.hardware_breakpoint and self.report_hwbreak:
            reply += b"hwbreak:;"
        return reply

    # -- threads ---------------------------------------------------------------------------------

    def _thread_vcpu(self, text: bytes, allow_all: bool = False) -> int | None:
        """gdb thread id -> vCPU index; 0 ("any") is the current one, -1 ("all") is None."""
        if text == b"-1":
            if not allow_all:
                raise PacketError("thread -1 is not allowed here")
            return None
        thread = _hex_int(text)
        if thread == 0:
            return self.general_vcpu
        if not 1 <= thread <= self.target.vcpu_count():
            raise GdbTargetError(f"no thread {thread}", EINVAL)
        return thread - 1

    def _select_thread(self, args: bytes) -> bytes:
        if not args:
            raise PacketError("H wants an operation and a thread")
        operation, thread = args[:1], args[1:]
        vcpu = self._thread_vcpu(thread, allow_all=True)
        if operation == b"g":
            self.general_vcpu = self.general_vcpu if vcpu is None else vcpu
        elif operation == b"c":
            self.resume_vcpu = vcpu
        else:
            raise PacketError(f"unknown H operation {operation!r}")
        return OK

    def _thread_alive(self, args: bytes) -> bytes:
        self._thread_vcpu(args)
        return OK

    def _thread_list(self) -> bytes:
        return b"m" + b",".join(b"%x" % (index + 1) for index in range(self.target.vcpu_count()))

    # -- registers ---------------------------------------------------------------------------------

    def _read_all_registers(self, args: bytes) -> bytes:
        values = self.target.read_registers(self.general_vcpu)
        return b"".join(self._encode_register(index, values) for index in range(len(self.layout)))

    def _encode_register(self, index: int, values: dict[str, int]) -> bytes:
        spec = self.layout[index]
        value = values.get(spec.source)
        if value is None:
            return b"xx" * spec.size  # unavailable (gdb docs, `g` reply)
        return (value & ((1 << spec.bitsize) - 1)).to_bytes(spec.size, "little").hex().encode()

    def _write_all_registers(self, args: bytes) -> bytes:
        current = self.target.read_registers(self.general_vcpu)
        changed: dict[str, int] = {}
        position = 0
        for spec in self.layout:
            field = args[position : position + 2 * spec.size]
            position += 2 * spec.size
            if len(field) < 2 * spec.size:
                break  # gdb may send fewer registers than it knows; the rest keep their values
            if b"x" in field:
                continue
            value = int.from_bytes(_hex_bytes(field), "little")
            if current.get(spec.source) is not None and current[spec.source] & ((1 << spec.bitsize) - 1) != value:
                changed[spec.source] = value
        if position < len(args):
            raise PacketError("G packet longer than the register file")
        if changed:
            self.target.write_registers(self.general_vcpu, changed)
        return OK

    def _register_index(self, text: bytes) -> int:
        index = _hex_int(text)
        if not 0 <= index < len(self.layout):
            raise GdbTargetError(f"no register {index}", EINVAL)
        return index

    def _read_register(self, args: bytes) -> bytes:
        index = self._register_index(args)
        return self._encode_register(index, self.target.read_registers(self.general_vcpu))

    def _write_register(self, args: bytes) -> bytes:
        number, separator, value_hex = args.partition(b"=")
        if not separator:
            raise PacketError("P wants N=VALUE")
        spec = self.layout[self._register_index(number)]
        data = _hex_bytes(value_hex)
        if len(data) != spec.size:
            raise PacketError(f"{spec.name} is {spec.size} bytes, not {len(data)}")
        self.target.write_registers(self.general_vcpu, {spec.source: int.from_bytes(data, "little")})
        return OK

    # -- memory --------------------------------------------------------------------------------------

    def _read_memory(self, args: bytes) -> bytes:
        address, length = _address_length(args)
        length = min(length, MAX_MEMORY_READ)
        return self.target.read_memory(self.general_vcpu, address, length).hex().encode()

    def _write_memory_hex(self, args: bytes) -> bytes:
        header, separator, data_hex = args.partition(b":")
        if not separator:
            raise PacketError("M wants ADDR,LENGTH:DATA")
        address, length = _address_length(header)
        data = _hex_bytes(data_hex)
        if len(data) != length:
            raise PacketError(f"M says {length} bytes but carries {len(data)}")
        if data:
            self.target.write_memory(self.general_vcpu, address, data)
        return OK

    def _write_memory_binary(self, args: bytes) -> bytes:
        header, separator, data = args.partition(b":")
        if not separator:
            raise PacketError("X wants ADDR,LENGTH:DATA")
        address, length = _address_length(header)
        if len(data) != length:
            raise PacketError(f"X says {length} bytes but carries {len(data)}")
        if data:  # X with no data is gdb's probe for binary downloads
            self.target.write_memory(self.general_vcpu, address, data)
        return OK

    # -- running ---------------------------------------------------------------------------------------

    def _resume(self, action: ResumeAction, address: bytes, vcpu: int | None = None) -> bytes | None:
        if vcpu is None:
            vcpu = self.resume_vcpu if self.resume_vcpu is not None else self.last_stop.vcpu
        if address:
            self.target.write_registers(vcpu, {"rip": _hex_int(address)})
        if self.last_stop.exit_code is not None:
            return self.stop_reply(self.last_stop)  # the run is over: say so again
        self.running = True
        self.target.resume(action, vcpu)
        return None

    def _v_cont(self, args: bytes) -> bytes | None:
        """`vCont;ACTION[:THREAD]...`: in all-stop mode one `s` (if any) wins, else continue."""
        if args == b"?":
            return b"vCont;c;C;s;S"
        if not args.startswith(b";"):
            raise PacketError("vCont wants ;ACTION")
        step_vcpu: int | None = None
        continue_all = False
        for item in args[1:].split(b";"):
            action, _, thread = item.partition(b":")
            if not action:
                raise PacketError("empty vCont action")
            code = action[:1]
            if code not in (b"c", b"C", b"s", b"S"):
                raise PacketError(f"vCont action {action!r} is not supported")
            vcpu = self._thread_vcpu(thread, allow_all=True) if thread else None
            if code in (b"s", b"S") and step_vcpu is None:
                step_vcpu = self.last_stop.vcpu if vcpu is None else vcpu
            elif code in (b"c", b"C"):
                continue_all = True
        if step_vcpu is not None:
            return self._resume(ResumeAction.STEP, b"", step_vcpu)
        if continue_all:
            return self._resume(ResumeAction.CONTINUE, b"")
        raise PacketError("vCont without an action")

    def _detach(self, args: bytes) -> bytes:
        self.detached = True
        self.running = False
        self.target.detach()
        return OK

    def _kill(self, args: bytes) -> bytes | None:
        self.detached = True
        self.running = False
        self.target.kill()
        return None  # `k` has no reply (gdb docs)

    # -- breakpoints ---------------------------------------------------------------------------------

    def _breakpoint(self, args: bytes, insert: bool) -> bytes:
        fields = args.split(b";")[0].split(b",")
        if len(fields) != 3:
            raise PacketError("Z/z wants TYPE,ADDR,KIND")
        try:
            kind = BreakKind(_hex_int(fields[0]))
        except ValueError:
            return EMPTY  # an unknown type is "not supported", not an error
        address, length = _hex_int(fields[1]), _hex_int(fields[2])
        if insert:
            self.target.insert_breakpoint(kind, address, length)
        else:
            self.target.remove_breakpoint(kind, address, length)
        return OK

    # -- queries ---------------------------------------------------------------------------------------

    def _query(self, args: bytes) -> bytes:
        name, _, rest = args.partition(b":")
        if name == b"Supported":
            features = rest.split(b";")
            self.report_swbreak = b"swbreak+" in features
            self.report_hwbreak = b"hwbreak+" in features
            return b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;vContSupported+" % (
                MAX_PACKET_SIZE
            )
        if name == b"Xfer":
            return self._xfer(rest)
        if args == b"fThreadInfo":
            return self._thread_list()
        if args == b"sThreadInfo":
            return b"l"
        if args == b"C":
            return b"QC%x" % (self.general_vcpu + 1)
        if name == b"Attached":
            return b"1"  # we attached to a running machine: gdb's quit detaches, not kills
        if args.startswith(b"ThreadExtraInfo,"):
            vcpu = self._thread_vcpu(args[len(b"ThreadExtraInfo,") :])
            return f"vCPU {vcpu}".encode().hex().encode()
        if args.startswith(b"Rcmd,"):
            return self._monitor(args[len(b"Rcmd,") :])
        if name == b"Symbol":
            return OK  # no symbol lookups wanted
        return EMPTY

    def _xfer(self, rest: bytes) -> bytes:
        parts = rest.split(b":")
        if len(parts) != 4 or parts[1] != b"read":
            raise PacketError("qXfer wants OBJECT:read:ANNEX:OFFSET,LENGTH")
        if parts[0] != b"features":
            return EMPTY
        if parts[2] != b"target.xml":
            return error_reply(0)  # gdb docs: E00 for an annex that does not exist
        offset, length = _address_length(parts[3])
        # The reply is binary: escaping may double some bytes, so keep it under the limit.
        length = min(length, MAX_PACKET_SIZE // 2)
        return escape_binary(read_chunk(self.description, offset, length))

    def _monitor(self, hex_command: bytes) -> bytes:
        try:
            command = _hex_bytes(hex_command).decode("utf-8")
        except UnicodeDecodeError as error:
            raise PacketError("monitor command is not UTF-8") from error
        try:
            output = self.target.monitor(command)
        except GdbTargetError as error:
            output = f"error: {error}\n"
        if not output:
            return OK
        if not output.endswith("\n"):
            output += "\n"
        return output.encode("utf-8").hex().encode()

    def _set(self, args: bytes) -> bytes:
        if args == b"StartNoAckMode":
            self.no_ack = True  # takes effect after this OK is sent (server.py)
            return OK
        return EMPTY

    def _v_packet(self, args: bytes) -> bytes | None:
        if args.startswith(b"Cont"):
            return self._v_cont(args[len(b"Cont") :])
        if args.startswith(b"Kill"):
            self._kill(b"")
            return OK
        return EMPTY  # vMustReplyEmpty and everything we do not support
