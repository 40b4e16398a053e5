"""BreakpointTable's per-exit index (hypervisor/vcpu/breakpoints.py): which breakpoints an access
is checked against. A candidate may still not match (Breakpoint.matches decides); what must hold
is that no breakpoint that could match is left out, and that misses cost no allocation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hypervisor.vcpu.breakpoints import NO_BREAKPOINTS, Breakpoint, BreakpointTable


def table_of(*breakpoints: Breakpoint) -> BreakpointTable:
    table = BreakpointTable()
    for breakpoint in breakpoints:
        table.add(breakpoint)
    return table


def test_an_empty_table_is_inactive() -> None:
    table = BreakpointTable()
    assert not table.active
    assert table.candidates(True, 0x3F8, 1) == ()


def test_a_port_miss_is_the_shared_empty_tuple() -> None:
    table = table_of(Breakpoint("io", 0x3F8), Breakpoint("mmio", (0xD000_0000, 0xD000_0FFF)))
    assert table.candidates(True, 0x520, 1) is NO_BREAKPOINTS
    assert table.candidates(False, 0xFEC0_0000, 4) is NO_BREAKPOINTS


def test_ports_and_mmio_windows_do_not_mix() -> None:
    port = Breakpoint("io", (0x500, 0x5FF))  # wide: a window
    mmio = Breakpoint("mmio", (0x500, 0x5FF))
    table = table_of(port, mmio)
    assert table.candidates(True, 0x520, 1) == (port,)
    assert table.candidates(False, 0x520, 1) == (mmio,)


def test_an_address_without_a_kind_is_checked_for_both() -> None:
    anything = Breakpoint(None, 0x70)
    table = table_of(anything)
    assert table.candidates(True, 0x70, 1) == (anything,)
    assert table.candidates(False, 0x70, 1) == (anything,)
    assert table.candidates(False, 0x71, 1) == ()


def test_a_wide_port_access_sees_each_port_it_covers_once() -> None:
    first, second = Breakpoint("io", 0x3F9), Breakpoint("io", (0x3F9, 0x3FA))
    table = table_of(first, second)
    assert table.candidates(True, 0x3F8, 4) == (first, second)
    assert table.candidates(True, 0x3FB, 2) == ()


def test_unaddressed_and_disabled_breakpoints() -> None:
    halt, port = Breakpoint("hlt"), Breakpoint("io", 0x60)
    table = table_of(halt, port)
    assert table.candidates(True, 0x60, 1) == (port, halt)
    assert table.candidates(False, 0, 0) == (halt,)  # a non-access exit
    table.set_enabled(port.id, False)
    assert table.candidates(True, 0x60, 1) == (halt,)
    table.delete(halt.id)
    assert not table.active


windows = st.tuples(st.sampled_from([None, "io", "mmio"]), st.integers(0, 0x300), st.integers(0, 0x40))


@given(st.lists(windows, max_size=12), st.booleans(), st.integers(0, 0x360), st.sampled_from([1, 2, 4, 8]))
def test_every_breakpoint_that_could_match_is_a_candidate(specs, is_port: bool, address: int, length: int) -> None:
    breakpoints = [Breakpoint(kind, (low, low + span) if span else low) for kind, low, span in specs]
    table = table_of(*breakpoints)
    found = table.candidates(is_port, address, length)
    assert len(set(found)) == len(found)
    for breakpoint in breakpoints:
        low, high = breakpoint.bounds or (0, 0)
        applies = breakpoint.kind is None or breakpoint.kind == ("io" if is_port else "mmio")
        overlaps = low <= address + length - 1 and high >= address
        assert (breakpoint in found) == (applies and overlaps), (breakpoint, address, length)
