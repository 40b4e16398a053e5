"""`--raw FILE@ADDR`: a flat binary copied to a guest physical address, entered in real mode."""

from __future__ import annotations

import pytest

from hypervisor.boot.raw import prepare_raw
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory


@pytest.fixture
def memory():
    guest = GuestMemory.flat(2 << 20)
    yield guest
    guest.close()


def test_raw_image_is_copied_and_entered_in_real_mode(memory):
    code = b"\xb0\x41\xe6\xf8\xf4"
    boot = prepare_raw(memory, code, 0x7C00)
    assert memory.read(0x7C00, len(code)) == code
    assert boot.protocol == "raw"
    assert (boot.entry.cs.selector, boot.entry.cs.base, boot.entry.rip) == (0, 0, 0x7C00)
    assert boot.entry.cr0 & 1 == 0
    assert boot.placements[0].gpa == 0x7C00 and boot.placements[0].size == len(code)


@pytest.mark.parametrize(("address", "size"), [(2 << 20, 1), ((2 << 20) - 4, 8), (-1, 4)])
def test_raw_image_that_does_not_fit_is_refused(memory, address, size):
    with pytest.raises(BootError, match="does not fit in the guest's 2 MiB of RAM"):
        prepare_raw(memory, b"\x90" * size, address)


def test_empty_raw_image_is_refused(memory):
    with pytest.raises(BootError, match="empty"):
        prepare_raw(memory, b"", 0x1000)
