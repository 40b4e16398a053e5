"""Kvm.lacking on real /dev/kvm: the capabilities pyhv needs at open, named with why."""

from __future__ import annotations

import pytest

from hypervisor.errors import KvmUnavailableError
from hypervisor.kvm import Kvm

pytestmark = pytest.mark.kvm


def test_this_host_has_the_capabilities_pyhv_needs() -> None:
    with Kvm() as kvm:
        assert kvm.lacking(["KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY"]) == []


def test_a_kvm_without_a_required_capability_is_refused_naming_it(monkeypatch) -> None:
    real = Kvm.check_extension
    monkeypatch.setattr(Kvm, "check_extension", lambda kvm, name: 0 if name == "KVM_CAP_IRQFD" else real(kvm, name))
    refusal = r"^this KVM lacks KVM_CAP_IRQFD \(device interrupts from I/O threads\)$"
    with pytest.raises(KvmUnavailableError, match=refusal):
        Kvm()


def test_ioapic_entries_and_msis_reach_kvms_irqchip() -> None:
    """Vm.ioapic_redirection_entry reads the in-kernel IOAPIC's table (masked after reset, as
    the 82093AA datasheet has it) and signal_msi is accepted once a vCPU exists."""
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        assert vm.ioapic_redirection_entry(0) == 1 << 16 and vm.ioapic_redirection_entry(23) == 1 << 16
        with pytest.raises(ValueError):
            vm.ioapic_redirection_entry(24)
        vm.create_vcpu(0)
        assert vm.signal_msi(0xFEE0_0000, 0x30) in (True, False)  # no error; a disabled LAPIC may drop it
    finally:
        vm.close()
        kvm.close()
