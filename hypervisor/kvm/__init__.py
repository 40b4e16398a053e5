"""The KVM API as Python objects: one class per file descriptor, one method per ioctl.

`Kvm` is /dev/kvm, `Vm` a VM fd, `Vcpu` a vCPU fd (after rust-vmm's kvm-ioctls). Every failing
ioctl raises KvmError naming the ioctl and the errno.
"""

from hypervisor.kvm.exits import ExitReason, SystemEventType
from hypervisor.kvm.system import Kvm, kvm_is_pvm
from hypervisor.kvm.vcpu import Vcpu
from hypervisor.kvm.vm import Vm

__all__ = ["ExitReason", "Kvm", "SystemEventType", "Vcpu", "Vm", "kvm_is_pvm"]
