"""The one refcount block encoding (block/qcow2/refcount.py) shared by the engine, the checker
and the creator: qcow2.rst "refcount_block_entry" packs sub-byte widths from the least
significant bit and stores wider ones big-endian."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.block.qcow2.create import Qcow2CreateOptions, _refcount_block
from hypervisor.block.qcow2.refcount import RefcountBlockCodec, decode_block, encode_block, refcount_typecode

CLUSTER = 512
WIDTHS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize(("bits", "values", "expected"), [
    (1, [1, 0, 1], b"\x05"),  # LSB first
    (2, [3, 1], b"\x07"),
    (4, [0xA, 0x5], b"\x5a"),
    (8, [7, 9], b"\x07\x09"),
    (16, [0x0102], b"\x01\x02"),  # big-endian
    (32, [1], b"\x00\x00\x00\x01"),
    (64, [2], b"\x00" * 7 + b"\x02"),
])  # fmt: skip
def test_the_layout_qcow2_rst_gives(bits: int, values: list[int], expected: bytes) -> None:
    block = encode_block(values, bits, CLUSTER)
    assert block.startswith(expected) and len(block) == CLUSTER and block.count(0) >= CLUSTER - len(expected)
    assert list(decode_block(block, bits)[: len(values)]) == values


@given(st.sampled_from(WIDTHS), st.data())
def test_decode_inverts_encode_at_every_width(bits: int, data: st.DataObject) -> None:
    entries = CLUSTER * 8 // bits
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=entries))
    block = encode_block(values, bits, CLUSTER)
    decoded = decode_block(block, bits)
    assert decoded.typecode == refcount_typecode(bits) and len(decoded) == entries
    assert list(decoded) == values + [0] * (entries - len(values))
    codec = RefcountBlockCodec(bits.bit_length() - 1, CLUSTER)
    assert codec.encode(decoded) == block and codec.decode(block) == decoded


@pytest.mark.parametrize("bits", WIDTHS)
def test_the_creators_first_block_is_refcount_one_for_the_clusters_in_use(bits: int) -> None:
    options = Qcow2CreateOptions(size=1 << 20, cluster_size=CLUSTER, refcount_bits=bits)
    block = _refcount_block(0, 5, options)
    assert list(decode_block(block, bits)[:6]) == [1, 1, 1, 1, 1, 0]
    assert block == encode_block(array(refcount_typecode(bits), [1] * 5), bits, CLUSTER)
