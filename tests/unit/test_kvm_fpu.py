"""The x87/SSE state (FpuState) through the XSAVE area (hypervisor/kvm/fpu.py): the FXSAVE legacy region's
layout (SDM Vol. 1 §10.5.1) and XSTATE_BV (§13.4.2)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from hypervisor.kvm.fpu import XSTATE_BV_OFFSET, fpu_from_xsave, xsave_with_fpu
from hypervisor.kvm.registers import FpuState

AREA_BYTES = 4096  # struct kvm_xsave


def area_with(**fields: int) -> bytearray:
    area = bytearray(AREA_BYTES)
    struct.pack_into("<HHBxHQQII", area, 0, fields.get("fcw", 0x37F), fields.get("fsw", 0), fields.get("ftw", 0),
                     fields.get("fop", 0), fields.get("fip", 0), fields.get("fdp", 0), fields.get("mxcsr", 0x1F80),
                     fields.get("mxcsr_mask", 0xFFFF))  # fmt: skip
    return area


def test_the_legacy_region_is_read_field_by_field() -> None:
    area = area_with(fcw=0x27F, fsw=0x3800, ftw=0x81, fop=0x123, fip=0x1122334455667788, fdp=0x99, mxcsr=0x9FC0)
    area[32:42] = bytes.fromhex("0807060504030201ffff")  # ST0/MM0
    area[32 + 7 * 16] = 0x77  # ST7
    area[160:176] = bytes(range(16))  # XMM0
    area[160 + 15 * 16] = 0xEE  # XMM15
    fpu = fpu_from_xsave(bytes(area))
    assert (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode) == (0x27F, 0x3800, 0x81, 0x123)
    assert (fpu.last_ip, fpu.last_dp, fpu.mxcsr) == (0x1122334455667788, 0x99, 0x9FC0)
    assert bytes(fpu.fpr[0][0:10]) == bytes.fromhex("0807060504030201ffff")
    assert fpu.fpr[7][0] == 0x77
    assert bytes(fpu.xmm[0]) == bytes(range(16))
    assert fpu.xmm[15][0] == 0xEE


def test_a_write_marks_x87_and_sse_present_and_keeps_the_rest() -> None:
    area = area_with(mxcsr_mask=0xFFBF)
    struct.pack_into("<Q", area, XSTATE_BV_OFFSET, 0b100)  # AVX present, x87 and SSE initial
    area[576:580] = b"\xaa\xbb\xcc\xdd"  # AVX's YMM_Hi128 component
    fpu = FpuState(fcw=0x37F, fsw=0x0100, ftwx=0xFF, mxcsr=0x1F80).with_fpr(0, b"\x42" + bytes(15))
    written = xsave_with_fpu(bytes(area), fpu)
    assert len(written) == AREA_BYTES
    assert struct.unpack_from("<Q", written, XSTATE_BV_OFFSET)[0] == 0b111
    assert written[576:580] == b"\xaa\xbb\xcc\xdd"
    assert struct.unpack_from("<I", written, 28)[0] == 0xFFBF  # MXCSR_MASK is the CPU's, kept
    assert written[32] == 0x42


@given(st.binary(min_size=XSTATE_BV_OFFSET + 16, max_size=XSTATE_BV_OFFSET + 16))
def test_reading_then_writing_back_changes_nothing_but_xstate_bv(start: bytes) -> None:
    area = start + bytes(AREA_BYTES - len(start))  # the legacy region and the XSAVE header
    written = xsave_with_fpu(area, fpu_from_xsave(area))
    bv = struct.unpack_from("<Q", area, XSTATE_BV_OFFSET)[0] | 0b11
    assert written[:5] + written[6:XSTATE_BV_OFFSET] == area[:5] + area[6:XSTATE_BV_OFFSET]  # byte 5 is reserved
    assert struct.unpack_from("<Q", written, XSTATE_BV_OFFSET)[0] == bv
    assert written[XSTATE_BV_OFFSET + 8 :] == area[XSTATE_BV_OFFSET + 8 :]
