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
