"""Property test: any sequence of operations on a qcow2 image reads like the same sequence on a raw
file, and leaves an image `qemu-img check` finds clean."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_oracle import KIB, check_clean, create, needs_qemu, read_all

from hypervisor.block.qcow2 import Qcow2Image

pytestmark = needs_qemu

SIZE = 256 * KIB + 512  # not a multiple of any cluster size

offsets = st.integers(min_value=0, max_value=SIZE - 1)
operation = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 40 * KIB), st.integers(1, 255)),
    st.tuples(st.just("zero"), offsets, st.integers(1, 40 * KIB), st.just(0)),
    st.tuples(st.just("discard"), offsets, st.integers(1, 40 * KIB), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("snapshot"), st.just(0), st.just(0), st.just(0)),
)
layouts = st.sampled_from(
    [
        ("cluster_size=512",),
        ("cluster_size=4k",),
        ("cluster_size=64k",),
        ("cluster_size=16k", "extended_l2=on"),
        ("cluster_size=4k", "compat=0.10"),
        ("cluster_size=4k", "refcount_bits=4"),
        ("cluster_size=4k", "backing"),
        ("cluster_size=16k", "extended_l2=on", "backing"),
        ("cluster_size=4k", "compat=0.10", "backing"),
    ]
)


@pytest.mark.timeout(300)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, ops=st.lists(operation, min_size=1, max_size=25))
def test_operations_match_a_raw_twin(layout: tuple[str, ...], ops: list[tuple[str, int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        options = [o for o in layout if o != "backing"]
        backing = None
        twin = bytearray(SIZE)
        if "backing" in layout:
            backing = Path(tmp) / "base.raw"
            twin[:] = bytes(range(256)) * (SIZE // 256) + bytes(range(SIZE % 256))
            backing.write_bytes(bytes(twin[: SIZE - 4096]))  # shorter: zeros past its end
            twin[SIZE - 4096 :] = bytes(4096)
        path = create(Path(tmp) / "h.qcow2", SIZE, *options, backing=backing, backing_fmt="raw")
        image = Qcow2Image.open(str(path))
        snapshots = 0
        try:
            for kind, offset, length, value in ops:
                length = min(length, SIZE - offset)
                if kind == "write":
                    image.write(offset, [bytes([value]) * length])
                    twin[offset : offset + length] = bytes([value]) * length
                elif kind == "zero":
                    image.write_zeroes(offset, length)
                    twin[offset : offset + length] = bytes(length)
                elif kind == "discard":  # contents unspecified afterwards: the twin follows
                    image.discard(offset, length)
                    after = bytearray(length)
                    image.readinto(offset, [memoryview(after)])
                    twin[offset : offset + length] = after
                elif kind == "flush":
                    image.flush()
                elif kind == "reopen":
                    image.close()
                    image = Qcow2Image.open(str(path))
                elif kind == "snapshot" and "refcount_bits=4" not in layout:
                    snapshots += 1
                    image.create_snapshot(f"h{snapshots}")
            assert read_all(image) == bytes(twin)
        finally:
            image.close()
        check_clean(path)
