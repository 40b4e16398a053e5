"""Untrusted kernels: whatever the bytes, the loaders answer with a BootError or a BootImage."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.boot.loader import prepare_kernel
from hypervisor.boot.placement import BootImage
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import ElfSegment, ElfSpec, MiB, make_bzimage, make_elf, multiboot_header, new_guest

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS = [
    make_bzimage(),
    make_bzimage(version=0x0206, xloadflags=0),
    make_elf(ElfSpec(entry=0x1000000, segments=[ElfSegment(0x1000000, b"\x90" * 256, memory_size=0x1000)],
                     notes=[(b"Xen", 18, struct.pack("<I", 0x1000010))])),
    make_elf(ElfSpec(entry=0x400000, segments=[ElfSegment(0x400000, b"\xf4" * 64)], elf_class=1, machine=3,
                     prefix=multiboot_header())),
    multiboot_header(aout=(0x200000, 0x200000, 0x200040, 0x200100, 0x200000)) + bytes(64),
]


def load(data: bytes) -> None:
    with new_guest(16 * MiB) as (guest, memory):
        try:
            result = prepare_kernel(memory, guest, data, "console=ttyS0", initrd=b"x" * 4096)
        except BootError as error:
            assert "\n" not in str(error)
        else:
            assert isinstance(result, BootImage)


@SETTINGS
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_mutated_kernels_never_escape_as_other_exceptions(seed, data):
    image = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(image) - 1))
        image[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(image))))
    load(bytes(image[:cut] if cut is not None else image))


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(blob):
    load(blob)


@SETTINGS
@given(field=st.sampled_from([0x1F1, 0x1F4, 0x206, 0x211, 0x22C, 0x234, 0x236, 0x238, 0x258, 0x260]),
       value=st.integers(0, 2**32 - 1))
def test_bzimage_header_fields_with_any_value(field, value):
    image = bytearray(make_bzimage())
    struct.pack_into("<I", image, field, value)
    load(bytes(image))
