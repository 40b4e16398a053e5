"""Saving and restoring what KVM holds for a VM: every vCPU's state and the in-kernel devices.

Each piece is the raw bytes of the struct its KVM_GET_* ioctl fills (api.rst section 4); a
snapshot stores them as they are and gives them back to the matching KVM_SET_* on the same kind
of host (the header records the host's CPU vendor and the struct sizes; restore refuses others).
Order on restore follows what KVM needs (api.rst and QEMU's kvm_arch_put_registers): special
registers before general ones, XCRs before XSAVE, MSRs (the TSC among them) before the LAPIC,
vCPU events and the MP state last.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypervisor.errors import KvmError
from hypervisor.kvm.registers import LapicState

if TYPE_CHECKING:
    from hypervisor.kvm import Kvm, Vcpu, Vm

log = logging.getLogger(__name__)

# (name, get ioctl, set ioctl, struct) of every per-vCPU blob, in restore order.
VCPU_BLOBS = (
    ("sregs", "KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
    ("regs", "KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
    ("xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
    ("xsave", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "struct kvm_xsave"),
    ("fpu", "KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu"),
    ("debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
)
# Blobs a host may refuse to give (XSAVE/XCRS without the capability): stored as absent.
OPTIONAL_BLOBS = {"xcrs", "xsave", "debugregs"}
IRQCHIPS = ("KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC")
# What loading each part needs from the host's KVM (api.rst, each ioctl's "Capability:" line).
# The irqchip and PIT ones a Machine cannot be built without (kvm/system.py
# REQUIRED_CAPABILITIES).
RESTORE_CAPABILITIES = ("KVM_CAP_VCPU_EVENTS", "KVM_CAP_MP_STATE", "KVM_CAP_ADJUST_CLOCK")
BLOB_CAPABILITIES = {"xsave": "KVM_CAP_XSAVE", "xcrs": "KVM_CAP_XCRS", "debugregs": "KVM_CAP_DEBUGREGS"}


@dataclass
class VcpuState:
    blobs: dict[str, bytes] = field(default_factory=dict)
    msrs: dict[int, int] = field(default_factory=dict)
    lapic: bytes = b""  # LapicState.registers: the page as KVM_GET_LAPIC gives it
    events: bytes = b""
    mp_state: int = 0


@dataclass
class VmState:
    irqchips: list[bytes] = field(default_factory=list)
    pit: bytes = b""
    clock: bytes = b""


def saved_msr_indices(kvm: Kvm) -> list[int]:
    """Every MSR this KVM can save (KVM_GET_MSR_INDEX_LIST), the TSC among them."""
    return kvm.msr_index_list()


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """The vCPU's whole state; call only while it is parked outside KVM_RUN."""
    state = VcpuState()
    for name, get_ioctl, _, struct in VCPU_BLOBS:
        try:
            state.blobs[name] = vcpu.get_state_blob(get_ioctl, struct)
        except KvmError as error:
            if name not in OPTIONAL_BLOBS:
                raise
            log.debug("vCPU %d: %s not saved: %s", vcpu.id, name, error)
    # KVM_GET_MSRS stops at the first MSR it cannot read; read one at a time past those.
    state.msrs = _readable_msrs(vcpu, msr_indices)
    state.lapic = vcpu.get_lapic().registers
    state.events = vcpu.get_state_blob("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")
    state.mp_state = vcpu.get_mp_state()
    return state


def _readable_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    values: dict[int, int] = {}
    remaining = list(indices)
    while remaining:
        got = vcpu.get_msrs(remaining)
        values.update(got)
        read = len(got)
        remaining = remaining[read + 1 :]  # skip the one KVM refused
    return values


def missing_capabilities(kvm: Kvm, vcpus: list[VcpuState]) -> list[str]:
    """The KVM_CAP_* names that loading `vcpus` (and the VM state) needs and `kvm` lacks."""
    needed = list(RESTORE_CAPABILITIES)
    for name, capability in BLOB_CAPABILITIES.items():
        if any(name in state.blobs for state in vcpus):
            needed.append(capability)
    return kvm.lacking(needed)


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    for name, _, set_ioctl, struct in VCPU_BLOBS:
        if name == "fpu" and "xsave" in state.blobs:
            continue  # XSAVE carries the x87/SSE state too, and more of it
        blob = state.blobs.get(name)
        if blob is None:
            if name in OPTIONAL_BLOBS:
                continue
            raise KvmError(set_ioctl, errno.EINVAL, f"the snapshot has no {name} for vCPU {vcpu.id}")
        vcpu.set_state_blob(set_ioctl, struct, blob)
    if state.msrs:
        _write_msrs(vcpu, state.msrs)
    try:
        lapic = LapicState(state.lapic)
    except ValueError as error:
        raise KvmError("KVM_SET_LAPIC", errno.EINVAL, f"vCPU {vcpu.id}: {error}") from error
    vcpu.set_lapic(lapic)
    vcpu.set_state_blob("KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events", state.events)
    vcpu.set_mp_state(state.mp_state)


def _write_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> None:
    try:
        vcpu.set_msrs(msrs)
    except KvmError:
        # One refused MSR (a read-only one KVM still lists) must not lose the others.
        for index, value in msrs.items():
            try:
                vcpu.set_msrs({index: value})
            except KvmError as error:
                log.debug("vCPU %d: MSR %#x not restored: %s", vcpu.id, index, error)


def capture_vm(vm: Vm) -> VmState:
    return VmState(
        irqchips=[vm.get_irqchip(chip) for chip in IRQCHIPS],
        pit=vm.get_state_blob("KVM_GET_PIT2", "struct kvm_pit_state2"),
        clock=vm.get_state_blob("KVM_GET_CLOCK", "struct kvm_clock_data"),
    )


def restore_vm(vm: Vm, state: VmState) -> None:
    for chip, blob in zip(IRQCHIPS, state.irqchips, strict=True):
        vm.set_irqchip(chip, blob)
    vm.set_state_blob("KVM_SET_PIT2", "struct kvm_pit_state2", state.pit)
    vm.set_clock(state.clock)
