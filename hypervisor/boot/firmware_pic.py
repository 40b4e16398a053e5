"""The 8259 PIC state a PC BIOS leaves behind: IRQs 0-7 at vectors 0x08-0x0f, IRQs 8-15 at
0x70-0x77 (the IBM PC/AT assignment SeaBIOS programs in pic_setup(), which real-mode code such
as kvm-unit-tests' realmode test relies on when it installs a handler for IRQ 11 at 0x73).

KVM's in-kernel PIC starts from its reset state, vector base 0 on both chips (arch/x86/kvm/
i8259.c kvm_pic_reset), as if no BIOS had run; pyhv has no BIOS, so the machine writes these
bases into the in-kernel PIC state (KVM_SET_IRQCHIP) before the guest starts. An OS that
initialises the PIC itself (Linux, any 32/64-bit kernel) overwrites them with its own ICWs.

The state is `struct kvm_irqchip` (linux/kvm.h): chip_id (u32), pad (u32), then for a PIC
`struct kvm_pic_state` (asm/kvm.h): last_irr, irr, imr, isr, priority_add, irq_base, ...
"""

from __future__ import annotations

from hypervisor.errors import HypervisorError

MASTER_VECTOR_BASE = 0x08  # IRQ 0-7: INT 08h-0Fh
SLAVE_VECTOR_BASE = 0x70  # IRQ 8-15: INT 70h-77h
PIC_STATE_OFFSET = 8  # after chip_id and pad
IRQ_BASE_OFFSET = PIC_STATE_OFFSET + 5  # kvm_pic_state.irq_base
VECTOR_BASE_ALIGNMENT = 8  # ICW2 bits 0-2 are the IRQ number


def with_vector_base(chip_state: bytes, vector_base: int) -> bytes:
    """`chip_state` (a PIC's struct kvm_irqchip bytes) with its interrupt vector base changed."""
    if len(chip_state) <= IRQ_BASE_OFFSET:
        raise HypervisorError(f"a PIC state of {len(chip_state)} bytes is too short for struct kvm_irqchip")
    if vector_base % VECTOR_BASE_ALIGNMENT or not 0 <= vector_base <= 0xF8:
        raise ValueError(f"a PIC vector base is a multiple of 8 below 0x100, not {vector_base:#x}")
    state = bytearray(chip_state)
    state[IRQ_BASE_OFFSET] = vector_base
    return bytes(state)
