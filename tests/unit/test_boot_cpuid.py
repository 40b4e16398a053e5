"""CPUID adjustments: APIC ids, topology, hypervisor leaves and hidden features (SDM vol. 2A CPUID)."""

from __future__ import annotations

import pytest

from hypervisor.boot.cpuid import CpuidEntry, FeatureBit, guest_cpuid, linux_feature_bit
from hypervisor.errors import ConfigError

SMAP = 1 << 20  # CPUID.(EAX=7,ECX=0):EBX bit 20
POPCNT = 1 << 23  # CPUID.1:ECX bit 23

SUPPORTED = [
    CpuidEntry(0x0, 0, 0, 0x1F, 0x68747541, 0x444D4163, 0x69746E65),
    CpuidEntry(0x1, 0, 0, 0x00830F10, 0x00020800, 0x01202000 | POPCNT, 0x178BFBFF),
    CpuidEntry(0x4, 0, 1, 0x00000121, 0x01C0003F, 0x3F, 0),  # L1d
    CpuidEntry(0x4, 1, 1, 0x00000143, 0x01C0003F, 0x3FF, 0),  # L2
    CpuidEntry(0x4, 2, 1, 0x00000163, 0x03C0003F, 0x3FFF, 0),  # L3
    CpuidEntry(0x4, 3, 1, 0, 0, 0, 0),  # no more caches
    CpuidEntry(0x7, 0, 1, 0, 0x219C07AB | SMAP, 0x0040069C, 0),
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 0),
    CpuidEntry(0xB, 1, 1, 4, 4, 0x201, 0),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
    CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x3007, 0),
]


def leaf(entries, function, index=0):
    (entry,) = [e for e in entries if e.function == function and e.index == index]
    return entry


@pytest.mark.parametrize(("vcpu", "cpus"), [(0, 1), (1, 2), (3, 4), (5, 8)])
def test_apic_id_and_count_in_leaf_1(vcpu, cpus):
    entries = guest_cpuid(SUPPORTED, vcpu, cpus)
    features = leaf(entries, 1)
    assert features.ebx >> 24 == vcpu
    assert features.ebx >> 16 & 0xFF == cpus
    assert features.ebx & 0xFFFF == 0x0800  # CLFLUSH line size kept
    assert features.ecx & (1 << 31)  # hypervisor present
    assert bool(features.edx & (1 << 28)) == (cpus > 1)  # HTT
    assert features.eax == 0x00830F10


def test_x2apic_topology_leaf_b():
    entries = guest_cpuid(SUPPORTED, 2, 4)
    smt, core, end = leaf(entries, 0xB, 0), leaf(entries, 0xB, 1), leaf(entries, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, 2)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (2, 4, 0x201, 2)
    assert (end.ebx, end.ecx >> 8 & 0xFF, end.ecx & 0xFF, end.edx) == (0, 0, 2, 2)
    assert all(e.flags & 1 for e in (smt, core, end))


def test_cache_leaf_4_core_counts():
    entries = guest_cpuid(SUPPORTED, 0, 4)
    assert leaf(entries, 4, 0).eax >> 26 == 3
    assert leaf(entries, 4, 0).eax >> 14 & 0xFFF == 0  # L1 private
    assert leaf(entries, 4, 2).eax >> 14 & 0xFFF == 3  # L3 shared by all four
    assert leaf(entries, 4, 0).eax & 0x3FFF == 0x121
    assert leaf(entries, 4, 3).eax == 0  # the terminating subleaf is left alone


def test_amd_core_count():
    assert leaf(guest_cpuid(SUPPORTED, 0, 6), 0x80000008).ecx & 0xFF == 5


def test_kvm_signature_and_features():
    entries = guest_cpuid(SUPPORTED, 0, 1)
    signature = leaf(entries, 0x40000000)
    text = b"".join(r.to_bytes(4, "little") for r in (signature.ebx, signature.ecx, signature.edx))
    assert text == b"KVMKVMKVM\0\0\0"
    assert signature.eax == 0x40000001
    assert leaf(entries, 0x40000001).eax == 0x01007AFB
    assert len([e for e in entries if e.function == 0x40000000]) == 1


def test_kvm_leaves_added_when_missing():
    supported = [e for e in SUPPORTED if e.function < 0x40000000]
    entries = guest_cpuid(supported, 0, 1)
    assert leaf(entries, 0x40000001).eax == 0
    assert leaf(entries, 0x40000000).ebx == 0x4B4D564B


def test_clearing_features_by_linux_number():
    assert linux_feature_bit(308) == FeatureBit(7, 0, "ebx", 20)  # SMAP
    assert linux_feature_bit(151) == FeatureBit(1, 0, "ecx", 23)  # POPCNT
    entries = guest_cpuid(SUPPORTED, 0, 1, clear=[linux_feature_bit(308), linux_feature_bit(151)])
    assert not leaf(entries, 7).ebx & SMAP
    assert not leaf(entries, 1).ecx & POPCNT
    assert leaf(entries, 7).ebx == (0x219C07AB | SMAP) & ~SMAP
    assert leaf(entries, 1).ecx & (1 << 31)  # other bits survive


def test_synthetic_linux_features_cannot_be_cleared_through_cpuid():
    with pytest.raises(ConfigError, match="synthetic"):
        linux_feature_bit(110)  # X86_FEATURE_SYSCALL32, a Linux-defined flag


def test_vcpu_id_out_of_range():
    with pytest.raises(ConfigError):
        guest_cpuid(SUPPORTED, 2, 2)


def test_supported_list_is_not_modified():
    before = list(SUPPORTED)
    guest_cpuid(SUPPORTED, 1, 2, clear=[linux_feature_bit(308)])
    assert SUPPORTED == before


def test_kvm_features_are_kept_on_hardware_virtualization():
    assert leaf(guest_cpuid(SUPPORTED, 0, 1), 0x40000001).eax == 0x01007AFB


def test_hypercall_features_are_hidden_on_kvm_pvm():
    from hypervisor.boot.cpuid import KVM_HYPERCALL_FEATURES

    supported = [
        e if e.function != 0x40000001 else CpuidEntry(0x40000001, 0, 0, 0x0101FEFB, 0, 0, 0) for e in SUPPORTED
    ]
    features = leaf(guest_cpuid(supported, 0, 2, hide_hypercall_features=True), 0x40000001).eax
    # PV_UNHALT (7), PV_SEND_IPI (11), PV_SCHED_YIELD (13), HC_MAP_GPA_RANGE (16) go ...
    assert features & (1 << 7 | 1 << 11 | 1 << 13 | 1 << 16) == 0
    assert KVM_HYPERCALL_FEATURES == 1 << 7 | 1 << 11 | 1 << 13 | 1 << 16
    # ... kvmclock (0, 3), async PF (4), steal time (5), PV EOI (6), PV TLB flush (9) and the
    # stable-clock bit (24) stay: they work through MSRs and shared memory, not hypercalls.
    assert features == 0x0101FEFB & ~KVM_HYPERCALL_FEATURES
    assert features & (1 << 0 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 24) == (
        1 << 0 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 24
    )
    assert leaf(guest_cpuid(supported, 0, 2), 0x40000001).eax == 0x0101FEFB
