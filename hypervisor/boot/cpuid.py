"""The CPUID a vCPU sees: KVM_GET_SUPPORTED_CPUID adjusted for this vCPU and this machine.

KVM's supported list is the ceiling; a VMM must still fill in the topology (KVM api.rst
"KVM_GET_SUPPORTED_CPUID": "userspace ... should fill in the APIC ID fields") and the
hypervisor leaves. References: Intel SDM vol. 2A "CPUID" (leaf 1 EBX[31:24] initial APIC id,
EBX[23:16] logical processor count with EDX.HTT; leaf 4 EAX[31:26] cores per package; leaves
0BH/1FH x2APIC topology), AMD APM vol. 3 (leaf 8000_0008H ECX[7:0] NC), and Linux
Documentation/virt/kvm/x86/cpuid.rst (0x40000000 "KVMKVMKVM\\0\\0\\0", 0x40000001 features).

Feature bits can be hidden by number with Linux's `clearcpuid=` numbering (word * 32 + bit,
arch/x86/include/asm/cpufeatures.h), the kvm_pvm fallback PLATFORM.md describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hypervisor.errors import ConfigError
from hypervisor.kvm.protocols import CpuidLeaf  # an entry from anywhere: KVM's list, a test's

# struct kvm_cpuid_entry2 flags (include/uapi/linux/kvm.h, KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
CPUID_FLAG_SIGNIFICANT_INDEX = 1

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMETERS = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_KVM_SIGNATURE = 0x40000000
LEAF_KVM_FEATURES = 0x40000001
LEAF_AMD_SIZE_IDENTIFIERS = 0x80000008

LEAF1_ECX_HYPERVISOR = 1 << 31  # SDM: "not used, always returns 0" on hardware; set by hypervisors
LEAF1_EDX_HTT = 1 << 28
# "KVMKVMKVM\0\0\0" in EBX, ECX, EDX (cpuid.rst).
KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x0000004D)
# Topology level types in ECX[15:8] of leaves 0BH/1FH (SDM vol. 2A table 3-8).
TOPOLOGY_INVALID, TOPOLOGY_SMT, TOPOLOGY_CORE = 0, 1, 2

# KVM paravirtual features (leaf 0x40000001 EAX, cpuid.rst) that a guest uses by issuing a
# hypercall (VMCALL/VMMCALL, Documentation/virt/kvm/x86/hypercalls.rst). On a kvm_pvm host a
# hypercall from emulated CPL0 hangs the vCPU with no exit (PLATFORM.md), so these are not
# offered there. The others (kvmclock, steal time, PV EOI, async PF, PV TLB flush...) work through
# MSRs and shared memory and stay.
KVM_FEATURE_PV_UNHALT = 1 << 7  # pv spinlocks wake a halted vCPU with KVM_HC_KICK_CPU
KVM_FEATURE_PV_SEND_IPI = 1 << 11  # IPIs through KVM_HC_SEND_IPI
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13  # KVM_HC_SCHED_YIELD to a preempted IPI target
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16  # KVM_HC_MAP_GPA_RANGE (encrypted-memory guests)
KVM_HYPERCALL_FEATURES = (
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD | KVM_FEATURE_HC_MAP_GPA_RANGE
)

Register = Literal["eax", "ebx", "ecx", "edx"]


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2 (function = leaf, index = subleaf)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def of(cls, entry: CpuidLeaf) -> CpuidEntry:
        return cls(entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx)


@dataclass(frozen=True)
class FeatureBit:
    """One feature flag: bit `bit` of `register` in CPUID leaf `function`, subleaf `index`."""

    function: int
    index: int
    register: Register
    bit: int


# Linux's capability words that mirror a CPUID register (cpufeatures.h, stable since 5.x);
# the other words hold Linux-defined synthetic flags that no CPUID bit controls.
LINUX_CPUID_WORDS: dict[int, tuple[int, int, Register]] = {
    0: (0x00000001, 0, "edx"),
    1: (0x80000001, 0, "edx"),
    4: (0x00000001, 0, "ecx"),
    5: (0xC0000001, 0, "edx"),
    6: (0x80000001, 0, "ecx"),
    9: (0x00000007, 0, "ebx"),
    10: (0x0000000D, 1, "eax"),
    12: (0x00000007, 1, "eax"),
    13: (0x80000008, 0, "ebx"),
    14: (0x00000006, 0, "eax"),
    15: (0x8000000A, 0, "edx"),
    16: (0x00000007, 0, "ecx"),
    17: (0x80000007, 0, "ebx"),
    18: (0x00000007, 0, "edx"),
    19: (0x8000001F, 0, "eax"),
}


def linux_feature_bit(number: int) -> FeatureBit:
    """The CPUID bit behind Linux feature number `number` (as in `clearcpuid=308` for SMAP)."""
    word, bit = divmod(number, 32)
    if number < 0 or word not in LINUX_CPUID_WORDS:
        raise ConfigError(
            f"CPU feature {number} is not a CPUID bit (Linux word {word} is synthetic); "
            "only the guest kernel's clearcpuid= can hide it"
        )
    function, index, register = LINUX_CPUID_WORDS[word]
    return FeatureBit(function, index, register, bit)


def _topology_entry(function: int, index: int, apic_id: int, cpus: int) -> CpuidEntry:
    """One subleaf of 0BH/1FH for one thread per core and `cpus` cores in one package."""
    core_shift = (cpus - 1).bit_length()
    if index == 0:
        eax, ebx, level = 0, 1, TOPOLOGY_SMT
    elif index == 1:
        eax, ebx, level = core_shift, cpus, TOPOLOGY_CORE
    else:
        eax, ebx, level = 0, 0, TOPOLOGY_INVALID
    return CpuidEntry(function, index, CPUID_FLAG_SIGNIFICANT_INDEX, eax, ebx, level << 8 | index, apic_id)


def _adjust(entry: CpuidEntry, apic_id: int, cpus: int) -> CpuidEntry:
    if entry.function == LEAF_FEATURES:
        ebx = (entry.ebx & 0x0000FFFF) | (apic_id & 0xFF) << 24 | (min(cpus, 0xFF) << 16)
        edx = entry.edx | LEAF1_EDX_HTT if cpus > 1 else entry.edx & ~LEAF1_EDX_HTT
        return replace(entry, ebx=ebx, ecx=entry.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
    if entry.function == LEAF_CACHE_PARAMETERS and entry.eax & 0x1F:
        # EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1: the
        # per-core L1/L2 are private (one thread per core), the L3 is shared by all vCPUs.
        sharing = cpus - 1 if (entry.eax >> 5 & 0x7) >= 3 else 0
        eax = (entry.eax & 0x3FFF) | (sharing & 0xFFF) << 14 | ((cpus - 1) & 0x3F) << 26
        return replace(entry, eax=eax)
    if entry.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
        return _topology_entry(entry.function, entry.index, apic_id, cpus)
    if entry.function == LEAF_AMD_SIZE_IDENTIFIERS:
        return replace(entry, ecx=(entry.ecx & ~0xFF) | ((cpus - 1) & 0xFF))
    return entry


def guest_cpuid(
    supported: Sequence[CpuidLeaf],
    vcpu_id: int,
    cpus: int,
    clear: Iterable[FeatureBit] = (),
    *,
    hide_hypercall_features: bool = False,
) -> list[CpuidEntry]:
    """The entries to give vCPU `vcpu_id` (also its APIC id) of `cpus` with KVM_SET_CPUID2.

    `hide_hypercall_features` (pass `hypervisor.kvm.kvm_is_pvm()`) leaves out the KVM paravirtual
    features whose use means a hypercall (KVM_HYPERCALL_FEATURES); on hardware virtualization
    leave it False and the guest gets every feature KVM supports."""
    if not 0 <= vcpu_id < cpus:
        raise ConfigError(f"vCPU id {vcpu_id} is outside 0..{cpus - 1}")
    entries = [
        _adjust(CpuidEntry.of(entry), vcpu_id, cpus)
        for entry in supported
        if entry.function not in (LEAF_KVM_SIGNATURE, LEAF_KVM_FEATURES)
    ]
    # Make sure the topology leaves describe both levels and end with an invalid level.
    for function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
        present = {e.index for e in entries if e.function == function}
        if present:
            entries.extend(
                _topology_entry(function, index, vcpu_id, cpus) for index in range(3) if index not in present
            )
    kvm_features = next((e.eax for e in supported if e.function == LEAF_KVM_FEATURES), 0)
    if hide_hypercall_features:
        kvm_features &= ~KVM_HYPERCALL_FEATURES
    entries.append(CpuidEntry(LEAF_KVM_SIGNATURE, 0, 0, LEAF_KVM_FEATURES, *KVM_SIGNATURE))
    entries.append(CpuidEntry(LEAF_KVM_FEATURES, 0, 0, kvm_features, 0, 0, 0))
    for feature in clear:
        entries = [
            replace(e, **{feature.register: getattr(e, feature.register) & ~(1 << feature.bit)})
            if (e.function, e.index) == (feature.function, feature.index)
            else e
            for e in entries
        ]
    return sorted(entries, key=lambda e: (e.function, e.index))
