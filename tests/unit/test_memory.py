import pytest

from hypervisor.errors import ConfigError, GuestMemoryError
from hypervisor.memory import GuestMemory

MiB = 1 << 20


def test_flat_memory_reads_back_what_was_written() -> None:
    memory = GuestMemory.flat(2 * MiB)
    memory.write(0x1000, b"hello")
    assert memory.read(0x1000, 5) == b"hello"
    memory.write_u64(0x2000, 0x1122334455667788)
    assert memory.read_u32(0x2000) == 0x55667788
    assert memory.read_u16(0x2006) == 0x1122
    assert memory.read_u8(0x2007) == 0x11
    assert memory.size == 2 * MiB
    memory.close()


def test_views_are_zero_copy() -> None:
    memory = GuestMemory.flat(1 * MiB)
    view = memory.view(0x100, 4)
    view[:] = b"abcd"
    assert memory.read(0x100, 4) == b"abcd"
    del view
    memory.close()


def test_regions_with_a_hole() -> None:
    memory = GuestMemory([(0, 1 * MiB), (4 * MiB, 1 * MiB)])
    memory.write(4 * MiB + 8, b"x")
    assert memory.read(4 * MiB + 8, 1) == b"x"
    assert memory.contains(0, MiB) and not memory.contains(MiB, 1)
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        memory.read(2 * MiB, 1)
    with pytest.raises(GuestMemoryError):
        memory.read(MiB - 2, 4)  # straddles the end of the first region
    assert [r.gpa for r in memory.regions] == [0, 4 * MiB]
    assert all(r.host_address for r in memory.regions)
    memory.close()


@pytest.mark.parametrize("gpa,length", [(-1, 1), (0, -1), (1 << 40, 1)])
def test_bad_addresses_are_refused(gpa: int, length: int) -> None:
    memory = GuestMemory.flat(MiB)
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)
    memory.close()


@pytest.mark.parametrize("regions", [[(0, 123)], [(0, 0)], [(1, 4096)], [(0, 2 * MiB), (MiB, MiB)]])
def test_bad_regions_are_refused(regions: list[tuple[int, int]]) -> None:
    with pytest.raises(ConfigError):
        GuestMemory(regions)


def test_hugepages_either_work_or_fail_cleanly() -> None:
    # Without reserved huge pages this must be a ConfigError now, never a SIGBUS on first touch.
    try:
        memory = GuestMemory.flat(2 * MiB, hugepages=True)
    except ConfigError as error:
        assert "huge-page" in str(error)
        return
    memory.write(2 * MiB - 1, b"x")
    assert memory.read(2 * MiB - 1, 1) == b"x"
    memory.close()


def test_hugepages_need_2mib_multiples() -> None:
    with pytest.raises(ConfigError, match="multiple of 2 MiB"):
        GuestMemory.flat(MiB, hugepages=True)
