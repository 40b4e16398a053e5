"""The typed vCPU state on a real vCPU (no guest runs): what KVM_GET_* gives comes back from
KVM_SET_* unchanged, and a changed field reaches KVM."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from hypervisor.kvm import Kvm, Vcpu
from hypervisor.kvm.registers import APIC_LVT_LINT0, FpuState, LapicState, SystemRegisters
from hypervisor.kvm.stats import VcpuStats

pytestmark = pytest.mark.kvm


@pytest.fixture()
def vcpu() -> Iterator[Vcpu]:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vm.create_irqchip()  # KVM_GET_LAPIC needs the in-kernel LAPIC
            yield vm.create_vcpu(0)
        finally:
            vm.close()


def test_special_registers_round_trip_through_kvm(vcpu: Vcpu) -> None:
    sregs = vcpu.get_sregs()
    assert isinstance(sregs, SystemRegisters) and sregs.cs.selector == 0xF000  # the reset state (SDM §9.1.4)
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs
    vcpu.set_sregs(sregs.with_segment("ds", base=0x1230, selector=0x123).with_control("cr3", 0x5000))
    changed = vcpu.get_sregs()
    assert (changed.ds.base, changed.ds.selector, changed.cr3) == (0x1230, 0x123, 0x5000)
    assert changed.cs == sregs.cs


def test_fpu_state_round_trips_through_kvm(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    assert isinstance(fpu, FpuState)
    vcpu.set_fpu_state(fpu)
    assert vcpu.get_fpu() == fpu
    changed = replace(fpu.with_xmm(5, bytes(range(16))), fcw=0x27F, mxcsr=0x1F80)
    vcpu.set_fpu_state(changed)
    read = vcpu.get_fpu()
    assert read.xmm[5] == bytes(range(16)) and read.fcw == 0x27F


def test_lapic_page_round_trips_through_kvm(vcpu: Vcpu) -> None:
    lapic = vcpu.get_lapic()
    assert isinstance(lapic, LapicState) and lapic.id == 0
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic().registers == lapic.registers
    vcpu.set_lapic(lapic.with_register(APIC_LVT_LINT0, 0x700))
    assert vcpu.get_lapic().lvt_lint0 & 0x700 == 0x700


def test_stats_of_a_vcpu_that_never_ran(vcpu: Vcpu) -> None:
    assert vcpu.read_stats() == VcpuStats.zero() and vcpu.run_calls == 0
