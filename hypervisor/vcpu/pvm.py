"""Emulating, on KVM_EXIT_INTERNAL_ERROR, the instructions kvm_pvm's emulator rejects.

On kvm_pvm hosts guest kernel code runs in KVM's instruction emulator, which gives up on a few
instructions Linux uses at CPL0 (shared/PLATFORM.md: int3, clac/stac, popcnt, fwait, ...). The
exit carries the instruction bytes; with the vCPU's registers and guest memory pyhv emulates
them itself (hypervisor.vcpu.emulate), so users' own kernels boot without command-line
workarounds. On hardware virtualization these exits do not happen.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu
    from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

EFER_LMA = 1 << 10  # SDM vol. 3A §2.2.1
CR0_PE = 1 << 0


class PvmEmulator:
    """The runner's `Emulator`: True when the instruction was emulated and the vCPU updated."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.counts: dict[str, int] = {}

    def __call__(self, vcpu: Vcpu, instruction: bytes) -> bool:
        # The decoder is loaded on the first emulation only: most guests never need it.
        from hypervisor.vcpu.emulate import CpuState, RegisterFile, X87Status, code_bits_from_cs, emulate, guest_reader

        sregs = vcpu.get_sregs()
        fpu = vcpu.get_fpu()
        cpu = CpuState(
            code_bits=code_bits_from_cs(bool(sregs.efer & EFER_LMA), bool(sregs.cs.l), bool(sregs.cs.db)),
            cpl=sregs.ss.dpl if sregs.cr0 & CR0_PE else 0,
            cr0=sregs.cr0,
            segment_bases={name: getattr(sregs, name).base for name in ("cs", "ds", "es", "ss", "fs", "gs")},
            x87=X87Status(fsw=fpu.fsw, ftw=fpu.ftwx),
        )
        result = emulate(
            instruction, RegisterFile.from_mapping(vcpu.get_regs()), cpu, guest_reader(vcpu.translate, self.memory.read)
        )
        if result is None:
            return False
        if result.x87 is not None:
            fpu.fsw, fpu.ftwx = result.x87.fsw, result.x87.ftw
            vcpu.set_fpu_state(fpu)
        vcpu.set_regs(**result.registers.as_dict())
        if result.exception is not None:
            vcpu.inject_exception(result.exception.vector, result.exception.error_code)
        self.counts[result.mnemonic] = self.counts.get(result.mnemonic, 0) + 1
        if self.counts[result.mnemonic] == 1:
            log.info("emulating %s for the guest (KVM's emulator cannot run it on this host)", result.mnemonic)
        return True
