"""The gdb remote serial protocol's framing: `$payload#checksum`, acks, escapes, run lengths.

gdb docs, "Overview" of the Remote Protocol: a packet is `$`, the payload, `#` and two hex digits
of the payload's modulo-256 byte sum. The receiver answers `+` (good) or `-` (resend) until
no-ack mode (`QStartNoAckMode`) is agreed. Inside a payload `}` escapes the next byte (xor 0x20)
and `X*N` repeats X another ord(N)-29 times ("Binary data", "Run-length encoding"). A lone 0x03
outside a packet is the interrupt request (Ctrl-C, "Interrupts").

Nothing here raises on bad input: the decoder turns every byte sequence into events, including
`BadPacket` for a wrong checksum, an overlong packet or a broken escape, so that a client's
garbage can never reach the guest or end the connection loop.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PACKET_START = ord("$")
PACKET_END = ord("#")
ESCAPE = ord("}")
RUN_LENGTH = ord("*")
ACK = ord("+")
NACK = ord("-")
INTERRUPT = 0x03
ESCAPE_XOR = 0x20
RUN_LENGTH_BIAS = 29  # "the repeat count is the character's value minus 29"
# The largest payload we accept and advertise as PacketSize in qSupported (gdb sizes its
# m/M/X/G packets by it). 16 KiB keeps one packet's work small and bounded.
MAX_PACKET_SIZE = 0x4000
# Bytes that must be escaped in binary replies (qXfer): the framing characters and the escape.
_MUST_ESCAPE = frozenset(b"$#}*")


class EventKind(enum.Enum):
    PACKET = "packet"
    INTERRUPT = "interrupt"
    ACK = "ack"
    NACK = "nack"
    BAD_PACKET = "bad-packet"  # checksum mismatch, overlong, broken escape: answer and go on


@dataclass(frozen=True)
class Event:
    kind: EventKind
    payload: bytes = b""  # the decoded payload for PACKET
    reason: str = ""  # why, for BAD_PACKET
    # For BAD_PACKET: True when the bytes were damaged on the way (bad checksum), so a `-` asks
    # for a resend; False when the packet itself is unusable and gets an error reply instead.
    resend: bool = False


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def encode_packet(payload: bytes) -> bytes:
    """Frames a reply. The payload must already be escaped when it is binary (`escape_binary`)."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Escapes `$`, `#`, `}` and `*` in binary data (gdb docs, "Binary data")."""
    if not _MUST_ESCAPE.intersection(data):
        return data
    out = bytearray()
    for byte in data:
        if byte in _MUST_ESCAPE:
            out.append(ESCAPE)
            out.append(byte ^ ESCAPE_XOR)
        else:
            out.append(byte)
    return bytes(out)


def decode_payload(raw: bytes) -> bytes | None:
    """Undoes escapes and run-length encoding of a received payload; None if it is malformed.

    Run-length repeats the previous *decoded* byte; an escaped byte is literal data, so a `*`
    after it is still a run-length marker (gdb never run-length encodes a `}` pair itself).
    """
    out = bytearray()
    index = 0
    length = len(raw)
    while index < length:
        byte = raw[index]
        if byte == ESCAPE:
            if index + 1 >= length:
                return None
            out.append(raw[index + 1] ^ ESCAPE_XOR)
            index += 2
        elif byte == RUN_LENGTH:
            if not out or index + 1 >= length:
                return None
            repeat = raw[index + 1] - RUN_LENGTH_BIAS
            # The docs rule out counts that would produce the framing characters themselves;
            # anything below 3 or that would overflow our bound is malformed.
            if repeat < 0 or len(out) + repeat > MAX_PACKET_SIZE:
                return None
            out.extend(out[-1:] * repeat)
            index += 2
        else:
            out.append(byte)
            index += 1
    return bytes(out)


class _State(enum.Enum):
    IDLE = 0  # between packets
    PAYLOAD = 1  # after `$`
    CHECKSUM = 2  # after `#`
    DISCARD = 3  # inside an overlong packet: skip to its `#` and checksum


class PacketDecoder:
    """Turns a byte stream from gdb into events; feed it whatever `recv` returned."""

    def __init__(self, max_size: int = MAX_PACKET_SIZE) -> None:
        self.max_size = max_size
        self._state = _State.IDLE
        self._payload = bytearray()
        self._checksum_digits = bytearray()
        self._overlong = False
        self.garbage_bytes = 0  # bytes outside any packet that meant nothing (counted, dropped)

    def feed(self, data: bytes) -> Iterator[Event]:
        for byte in data:
            event = self._feed_byte(byte)
            if event is not None:
                yield event

    def _feed_byte(self, byte: int) -> Event | None:
        state = self._state
        if state is _State.IDLE:
            if byte == PACKET_START:
                self._start_packet()
            elif byte == INTERRUPT:
                return Event(EventKind.INTERRUPT)
            elif byte == ACK:
                return Event(EventKind.ACK)
            elif byte == NACK:
                return Event(EventKind.NACK)
            else:
                self.garbage_bytes += 1
            return None
        if state is _State.PAYLOAD or state is _State.DISCARD:
            if byte == PACKET_END:
                self._state = _State.CHECKSUM
                self._checksum_digits.clear()
            elif byte == PACKET_START:
                # A new packet inside a packet: gdb gave up on the old one (a resend after a
                # timeout); drop what we had and start again.
                log.debug("gdb: packet restarted after %d bytes", len(self._payload))
                self._start_packet()
            elif state is _State.PAYLOAD:
                if len(self._payload) >= self.max_size:
                    self._state = _State.DISCARD
                    self._overlong = True
                    self._payload.clear()
                else:
                    self._payload.append(byte)
            return None
        # CHECKSUM: two hex digits
        self._checksum_digits.append(byte)
        if len(self._checksum_digits) < 2:
            return None
        self._state = _State.IDLE
        return self._finish_packet()

    def _start_packet(self) -> None:
        self._state = _State.PAYLOAD
        self._payload.clear()
        self._overlong = False

    def _finish_packet(self) -> Event:
        if self._overlong:
            return Event(EventKind.BAD_PACKET, reason=f"packet longer than {self.max_size} bytes")
        raw = bytes(self._payload)
        try:
            expected = int(self._checksum_digits.decode("ascii"), 16)
        except (UnicodeDecodeError, ValueError):
            return Event(EventKind.BAD_PACKET, reason="checksum is not two hex digits", resend=True)
        if checksum(raw) != expected:
            reason = f"checksum {expected:02x}, payload sums to {checksum(raw):02x}"
            return Event(EventKind.BAD_PACKET, reason=reason, resend=True)
        payload = decode_payload(raw)
        if payload is None:
            return Event(EventKind.BAD_PACKET, reason="broken escape or run-length sequence")
        return Event(EventKind.PACKET, payload)
