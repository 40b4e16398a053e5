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
from typing import Any

from hypervisor.kvm.ffi import ffi

# The legacy region of the XSAVE area is the FXSAVE image (SDM Vol. 1 §10.5.1, Table 10-2, the
# 64-bit layout: FPU IP and DP are 64 bits).
_CONTROL = struct.Struct("<HHBxHQQI")  # FCW, FSW, abridged FTW, reserved, FOP, FIP, FDP, MXCSR
_FPR_OFFSET = 32  # ST0/MM0..ST7/MM7, 16 bytes a slot
_XMM_OFFSET = 160  # XMM0..XMM15, 16 bytes each
_SLOT = 16
_FPR_SLOTS = 8
_XMM_SLOTS = 16
# XSAVE header (SDM Vol. 1 §13.4.2): XSTATE_BV at byte 512 of the area.
_XSTATE_BV = struct.Struct("<Q")
XSTATE_BV_OFFSET = 512
XFEATURE_X87 = 1 << 0
XFEATURE_SSE = 1 << 1


def fpu_from_xsave(area: bytes) -> Any:
    """A `struct kvm_fpu *` holding the x87/SSE part of a KVM_GET_XSAVE area."""
    fpu = ffi.new("struct kvm_fpu *")
    fcw, fsw, ftw, fop, fip, fdp, mxcsr = _CONTROL.unpack_from(area, 0)
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode = fcw, fsw, ftw, fop
    fpu.last_ip, fpu.last_dp, fpu.mxcsr = fip, fdp, mxcsr
    ffi.memmove(fpu.fpr, area[_FPR_OFFSET : _FPR_OFFSET + _FPR_SLOTS * _SLOT], _FPR_SLOTS * _SLOT)
    ffi.memmove(fpu.xmm, area[_XMM_OFFSET : _XMM_OFFSET + _XMM_SLOTS * _SLOT], _XMM_SLOTS * _SLOT)
    return fpu


def xsave_with_fpu(area: bytes, fpu: Any) -> bytes:
    """`area` (a KVM_GET_XSAVE area) with the x87/SSE state of `fpu` and both components marked
    present in XSTATE_BV, so that KVM_SET_XSAVE and the next XRSTOR keep them. MXCSR_MASK and the
    rest of the area are kept."""
    out = bytearray(area)
    _CONTROL.pack_into(out, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr)
    out[_FPR_OFFSET : _FPR_OFFSET + _FPR_SLOTS * _SLOT] = bytes(ffi.buffer(fpu.fpr))
    out[_XMM_OFFSET : _XMM_OFFSET + _XMM_SLOTS * _SLOT] = bytes(ffi.buffer(fpu.xmm))
    (present,) = _XSTATE_BV.unpack_from(out, XSTATE_BV_OFFSET)
    _XSTATE_BV.pack_into(out, XSTATE_BV_OFFSET, present | XFEATURE_X87 | XFEATURE_SSE)
    return bytes(out)
