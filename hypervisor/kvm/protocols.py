"""What the KVM layer needs of the values other layers hand it, as structural types.

hypervisor/kvm/ is the bottom layer and imports nothing above it: a caller's CPUID entries
(hypervisor.boot.cpuid.CpuidEntry) and guest memory (hypervisor.memory.GuestMemory) are taken by
the attributes the ioctls read, not by their classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class CpuidLeaf(Protocol):
    """One struct kvm_cpuid_entry2 (function = leaf, index = subleaf), as KVM_SET_CPUID2 wants it."""

    @property
    def function(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def eax(self) -> int: ...
    @property
    def ebx(self) -> int: ...
    @property
    def ecx(self) -> int: ...
    @property
    def edx(self) -> int: ...


class SlotRegion(Protocol):
    """A guest RAM region KVM_SET_USER_MEMORY_REGION maps: guest address, size, host mapping."""

    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def host_address(self) -> int: ...


class SlotMemory(Protocol):
    """Guest memory as Vm.map_memory reads it: its regions."""

    @property
    def regions(self) -> Sequence[SlotRegion]: ...
