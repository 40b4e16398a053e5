"""RSP framing: checksums, acks, escapes, run lengths, interrupts, and bad input."""

from __future__ import annotations

from hypervisor.debug.gdb.packets import (
    MAX_PACKET_SIZE,
    EventKind,
    PacketDecoder,
    checksum,
    decode_payload,
    encode_packet,
    escape_binary,
)


def events(data: bytes, decoder: PacketDecoder | None = None) -> list[tuple[EventKind, bytes]]:
    decoder = decoder or PacketDecoder()
    return [(event.kind, event.payload) for event in decoder.feed(data)]


def test_packets_as_gdb_sends_them() -> None:
    # Recorded from Debian's gdb 13.1 (`set debug remote 1`).
    assert events(b"$qTStatus#49") == [(EventKind.PACKET, b"qTStatus")]
    assert events(b"+$vCont;s:1;c#c1") == [(EventKind.ACK, b""), (EventKind.PACKET, b"vCont;s:1;c")]
    assert events(b"$qRcmd,68656c6c6f#ca-") == [(EventKind.PACKET, b"qRcmd,68656c6c6f"), (EventKind.NACK, b"")]


def test_packets_split_across_reads_are_reassembled() -> None:
    decoder = PacketDecoder()
    stream = b"$m1000,1#8b"
    collected = []
    for index in range(len(stream)):
        collected += events(stream[index : index + 1], decoder)
    assert collected == [(EventKind.PACKET, b"m1000,1")]


def test_interrupt_byte_outside_a_packet() -> None:
    assert events(b"\x03") == [(EventKind.INTERRUPT, b"")]


def test_bad_checksum_asks_for_a_resend() -> None:
    [event] = list(PacketDecoder().feed(b"$g#00"))
    assert event.kind is EventKind.BAD_PACKET and event.resend
    [event] = list(PacketDecoder().feed(b"$g#zz"))
    assert event.kind is EventKind.BAD_PACKET and event.resend


def test_garbage_between_packets_is_counted_and_dropped() -> None:
    decoder = PacketDecoder()
    assert events(b"hello\xff\x00$g#67", decoder) == [(EventKind.PACKET, b"g")]
    assert decoder.garbage_bytes == 7


def test_overlong_packet_is_refused_and_the_stream_recovers() -> None:
    decoder = PacketDecoder(max_size=16)
    body = b"M1000,20:" + b"00" * 32
    result = list(decoder.feed(b"$" + body + b"#%02x" % checksum(body) + b"$g#67"))
    assert result[0].kind is EventKind.BAD_PACKET and not result[0].resend
    assert "longer than 16" in result[0].reason
    assert (result[1].kind, result[1].payload) == (EventKind.PACKET, b"g")


def test_a_new_packet_start_abandons_the_unfinished_one() -> None:
    assert events(b"$m10$g#67") == [(EventKind.PACKET, b"g")]


def test_escapes_and_run_length_are_decoded() -> None:
    # `}` escapes the next byte xor 0x20; "0* " is "0000" (gdb docs, Overview).
    assert decode_payload(b"X1000,3:}]}\x03}\n") == b"X1000,3:}#*"
    assert decode_payload(b"0* ") == b"0000"
    assert decode_payload(b"a*!b") == b"aaaaab"


def test_broken_escapes_and_run_lengths_are_malformed() -> None:
    assert decode_payload(b"abc}") is None
    assert decode_payload(b"*a") is None  # nothing to repeat
    assert decode_payload(b"a*") is None
    assert decode_payload(b"a*\x01") is None  # negative count
    raw = b"$a*\x01#" + b"%02x" % checksum(b"a*\x01")
    [event] = list(PacketDecoder().feed(raw))
    assert event.kind is EventKind.BAD_PACKET and not event.resend


def test_run_length_cannot_exceed_the_packet_bound() -> None:
    raw = b"a" + b"*~" * (MAX_PACKET_SIZE // 90 + 1)
    assert decode_payload(raw) is None


def test_encode_and_escape_round_trip() -> None:
    assert encode_packet(b"OK") == b"$OK#9a"
    data = bytes(range(256))
    escaped = escape_binary(data)
    assert not set(b"$#*").intersection(escaped.replace(b"}\x04", b"").replace(b"}\x03", b"").replace(b"}\n", b""))
    assert decode_payload(escaped) == data
    framed = encode_packet(escaped)
    [event] = list(PacketDecoder().feed(framed))
    assert event.payload == data


def test_every_byte_sequence_is_handled_without_raising() -> None:
    import random

    rng = random.Random(8)
    decoder = PacketDecoder(max_size=64)
    for _ in range(2000):
        chunk = bytes(rng.choice(b"$#}*+-\x03ab0f9") for _ in range(rng.randrange(1, 40)))
        for event in decoder.feed(chunk):
            assert event.kind in EventKind
