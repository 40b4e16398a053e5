"""The x87/SSE state of a vCPU as `struct kvm_fpu`, carried through the XSAVE area.

KVM_GET_FPU and KVM_SET_FPU copy the legacy FXSAVE region of the guest's XSAVE buffer and
ignore the XSAVE header. When the guest's x87 state is in its initial configuration (after
FNINIT, for one), XSAVEOPT/XSAVES leave XSTATE_BV bit 0 clear and do not write the region: then
KVM_GET_FPU reads stale registers, and a register written by KVM_SET_FPU is thrown away by the
next XRSTOR, which loads the initial state for every component whose XSTATE_BV bit is clear
(SDM Vol. 1 §13.8.1). Seen on this project's host: an emulated MMX `movq %rax, %mm0` followed by
`movq %mm0, (mem)` stored 0 (kvm-unit-tests emulator, "movq (mmx, read)").

KVM_GET_XSAVE gives the architectural values (initial values for a component in its initial
configuration) and KVM_SET_XSAVE honours XSTATE_BV, so pyhv reads and writes kvm_fpu through
the XSAVE area, setting the x87 and SSE bits of XSTATE_BV on a write, and falls back to the FPU
ioctls on a host without XSAVE.
"""

from __future__ import annotations

import struct

from hypervisor.kvm.registers import FPR_SLOTS, SLOT_BYTES, XMM_SLOTS, FpuState

# The legacy region of the XSAVE area is the FXSAVE image (SDM Vol. 1 §10.5.1, Table 10-2, the
# 64-bit layout: FPU IP and DP are 64 bits).
_CONTROL = struct.Struct("<HHBxHQQI")  # FCW, FSW, abridged FTW, reserved, FOP, FIP, FDP, MXCSR
_FPR_OFFSET = 32  # ST0/MM0..ST7/MM7, 16 bytes a slot
_XMM_OFFSET = 160  # XMM0..XMM15, 16 bytes each
_FPR_END = _FPR_OFFSET + FPR_SLOTS * SLOT_BYTES
_XMM_END = _XMM_OFFSET + XMM_SLOTS * SLOT_BYTES
# XSAVE header (SDM Vol. 1 §13.4.2): XSTATE_BV at byte 512 of the area.
_XSTATE_BV = struct.Struct("<Q")
XSTATE_BV_OFFSET = 512
XFEATURE_X87 = 1 << 0
XFEATURE_SSE = 1 << 1


def _slots(data: bytes, count: int) -> tuple[bytes, ...]:
    return tuple(data[slot * SLOT_BYTES : (slot + 1) * SLOT_BYTES] for slot in range(count))


def fpu_from_xsave(area: bytes) -> FpuState:
    """The x87/SSE part of a KVM_GET_XSAVE area."""
    fcw, fsw, ftw, fop, fip, fdp, mxcsr = _CONTROL.unpack_from(area, 0)
    return FpuState(
        fpr=_slots(area[_FPR_OFFSET:_FPR_END], FPR_SLOTS),
        fcw=fcw, fsw=fsw, ftwx=ftw, last_opcode=fop, last_ip=fip, last_dp=fdp,
        xmm=_slots(area[_XMM_OFFSET:_XMM_END], XMM_SLOTS),
        mxcsr=mxcsr,
    )  # fmt: skip


def xsave_with_fpu(area: bytes, fpu: FpuState) -> bytes:
    """`area` (a KVM_GET_XSAVE area) with the x87/SSE state of `fpu` and both components marked
    present in XSTATE_BV, so that KVM_SET_XSAVE and the next XRSTOR keep them. MXCSR_MASK and the
    rest of the area are kept."""
    out = bytearray(area)
    _CONTROL.pack_into(out, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr)
    out[_FPR_OFFSET:_FPR_END] = b"".join(fpu.fpr)
    out[_XMM_OFFSET:_XMM_END] = b"".join(fpu.xmm)
    (present,) = _XSTATE_BV.unpack_from(out, XSTATE_BV_OFFSET)
    _XSTATE_BV.pack_into(out, XSTATE_BV_OFFSET, present | XFEATURE_X87 | XFEATURE_SSE)
    return bytes(out)
