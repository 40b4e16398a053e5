"""/dev/kvm: API version, capabilities, supported CPUID and MSRs, VM creation."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from hypervisor.errors import KvmError, KvmUnavailableError
from hypervisor.kvm.ffi import ffi, ioctl, ioctl_value, lib
from hypervisor.kvm.vcpu import CpuidRecord
from hypervisor.kvm.vm import Vm

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
# api.rst: "the API version ... 12 ... is stable"; anything else is not a KVM we know.
EXPECTED_API_VERSION = 12
# A buffer large enough for every CPUID leaf KVM reports today; grown on E2BIG (api.rst,
# KVM_GET_SUPPORTED_CPUID: "If the number of entries is too low ... E2BIG").
INITIAL_CPUID_ENTRIES = 128
MAX_CPUID_ENTRIES = 4096

# What pyhv needs from KVM and why (the capability name is what a user can look up).
REQUIRED_CAPABILITIES = {
    "KVM_CAP_USER_MEMORY": "guest RAM from host memory",
    "KVM_CAP_SET_TSS_ADDR": "the TSS page Intel hosts need for real mode",
    "KVM_CAP_IRQCHIP": "the in-kernel interrupt controllers",
    "KVM_CAP_PIT2": "the in-kernel timer",
    "KVM_CAP_IMMEDIATE_EXIT": "stopping a running vCPU without races",
    "KVM_CAP_EXT_CPUID": "setting the guest's CPUID",
    "KVM_CAP_IOEVENTFD": "virtio notifications without a vCPU exit",
    "KVM_CAP_IRQFD": "device interrupts from I/O threads",
}


def kvm_is_pvm() -> bool:
    """True on a kvm_pvm host, where guest kernel code is emulated (PLATFORM.md)."""
    return Path("/sys/module/kvm_pvm").exists()


class Kvm:
    """An open /dev/kvm. Use as a context manager or call close()."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise KvmUnavailableError(
                f"{path} does not exist: this machine has no KVM (enable virtualization in the "
                "firmware, load kvm_intel or kvm_amd, or use a VM with nested virtualization)"
            ) from error
        except PermissionError as error:
            raise KvmUnavailableError(
                f"permission denied opening {path}: add your user to the 'kvm' group or run as root"
            ) from error
        except OSError as error:
            raise KvmUnavailableError(f"cannot open {path}: {error.strerror}") from error
        try:
            self._check_api()
        except BaseException:
            os.close(self.fd)
            raise

    def _check_api(self) -> None:
        try:
            version = ioctl_value(self.fd, "KVM_GET_API_VERSION")
        except KvmError as error:
            raise KvmUnavailableError(f"{self.path} is not a KVM device ({error})") from error
        if version != EXPECTED_API_VERSION:
            raise KvmUnavailableError(
                f"{self.path} speaks KVM API version {version}; pyhv needs {EXPECTED_API_VERSION}"
            )
        missing = [f"{name} ({REQUIRED_CAPABILITIES[name]})" for name in self.lacking(REQUIRED_CAPABILITIES)]
        if missing:
            raise KvmUnavailableError("this KVM lacks " + ", ".join(missing))

    def check_extension(self, capability: str) -> int:
        """KVM_CHECK_EXTENSION for a KVM_CAP_* name; 0 when unsupported."""
        return ioctl_value(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, capability))

    def lacking(self, capabilities: Iterable[str]) -> list[str]:
        """The KVM_CAP_* names of `capabilities` this KVM does not support, in their order."""
        return [name for name in capabilities if self.check_extension(name) <= 0]

    @property
    def vcpu_mmap_size(self) -> int:
        return ioctl_value(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_NR_VCPUS") or 4

    @property
    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.recommended_vcpus

    def supported_cpuid(self) -> list[CpuidRecord]:
        """KVM_GET_SUPPORTED_CPUID: the ceiling hypervisor.boot.cpuid.guest_cpuid adjusts."""
        count = INITIAL_CPUID_ENTRIES
        while True:
            buffer = ffi.new("struct kvm_cpuid2 *", {"nent": count, "entries": count})
            try:
                ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", buffer)
            except KvmError as error:
                if error.errno == errno.E2BIG and count < MAX_CPUID_ENTRIES:
                    count *= 2
                    continue
                raise
            return [
                CpuidRecord(int(e.function), int(e.index), int(e.flags), int(e.eax), int(e.ebx), int(e.ecx), int(e.edx))
                for e in buffer.entries[0 : buffer.nent]
            ]

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as error:
            if error.errno != errno.E2BIG:
                raise
        count = probe.nmsrs
        buffer = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", buffer)
        return list(buffer.indices[0 : buffer.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, ioctl_value(self.fd, "KVM_CREATE_VM", 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

