"""Emulating, on KVM_EXIT_INTERNAL_ERROR, the instructions kvm_pvm's emulator rejects."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu


def pvm_emulator(vcpu: Vcpu, instruction: bytes) -> bool:
    return False  # TEMPORARY: wired to hypervisor.vcpu.emulate when it lands
