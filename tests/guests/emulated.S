/*
 * 64-bit CPL0 test guest for the instructions a kvm_pvm host's KVM cannot run at CPL0 and pyhv
 * emulates (hypervisor/vcpu/emulate.py): int imm8, rdpru, xgetbv, invpcid, clwb, lock cmpxchg16b,
 * movbe, MMX movq.
 *
 * Each check prints one line on COM1, `NAME VV` where VV is the vector of the exception the
 * instruction raised (hex) or `ff` when it raised none; a few lines add what they checked.
 * tests/kvm/test_emulated_instructions.py compares the lines with what the guest's CPUID says
 * the CPU must do (SDM Vol. 2 instruction pages). Under hardware virtualization the CPU runs
 * the same instructions itself, so the same guest checks pyhv's emulation against silicon.
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

#define IDT_VECTORS 0x42 /* vectors 0..0x41: `int $0x50` is beyond the IDT limit */
#define GATE_INTERRUPT 0x8e /* present, DPL 0, 64-bit interrupt gate (SDM Vol. 3 §6.14.1) */
#define GATE_TRAP 0x8f
#define NO_FAULT 0xff
#define RFLAGS_ZF 0x40
#define CR0_EM 0x4 /* x87/MMX instructions raise #UD (SDM Vol. 3 §2.5) */
#define CR0_TS 0x8 /* ... or #NM */
/* Free RAM below 2 MiB (identity-mapped, writable): an 8-byte operand here crosses a 4 KiB page. */
#define PAGE_CROSSING 0x1fffc

/* TRY name, instruction: run it with `resume` set past it, keep the RFLAGS, RAX and RDX it
 * left in `flags_after`, `rax_after`, `rdx_after`, print "name VV". One instruction only: a
 * `;` in the arguments would end the macro call. */
.macro TRY name, insn:vararg
    movq $NO_FAULT, last_vector
    movq $3f, resume
    \insn
3:  pushfq
    popq flags_after
    mov %rax, rax_after
    mov %rdx, rdx_after
    mov $\name, %esi
    call puts
    mov last_vector, %eax
    call puthex8
.endm

/* EXPECT_RAX value: print " ok" if the RAX the last TRY left is `value`, else " bad". */
.macro EXPECT_RAX value
    mov $text_bad, %esi
    movabs $\value, %rcx
    cmp %rcx, rax_after
    jne 1f
    mov $text_ok, %esi
1:  call puts
.endm

    .text
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    ENTER_LONG_MODE
    mov $handler_ud, %eax
    mov $6, %edi
    mov $GATE_INTERRUPT, %esi
    call set_gate
    mov $handler_gp, %eax
    mov $13, %edi
    call set_gate
    mov $handler_8, %eax
    mov $8, %edi
    call set_gate
    mov $handler_40, %eax
    mov $0x40, %edi
    call set_gate
    mov $handler_41, %eax
    mov $0x41, %edi
    mov $GATE_TRAP, %esi
    call set_gate
    lidt idt_descriptor

    /* int imm8 through an interrupt gate: the handler sees the next instruction as return RIP. */
    mov $0x1234, %rbx
    sti /* nothing is programmed to interrupt: IF=1 only shows what each gate type does */
    int $0x40
after_int40:
    mov $name_int40, %esi
    call puts
    mov int40_return, %rax
    cmp $after_int40, %rax
    jne 1f
    cmp $0x5678, %rbx /* the handler ran (it changes RBX) and IRET came back here */
    jne 1f
    mov $text_ok, %esi
    jmp 2f
1:  mov $text_bad, %esi
2:  call puts
    mov $name_int40_if, %esi
    call puts
    mov int40_flags, %rax
    shr $9, %eax
    and $1, %eax
    call puthex8
    call newline

    /* RFLAGS.IF as each handler saw it: an interrupt gate clears it, a trap gate keeps it. */
    int $0x41
    cli
    mov $name_int41, %esi
    call puts
    mov int41_flags, %rax
    shr $9, %eax
    and $1, %eax
    call puthex8
    call newline

    /* int $8: a software interrupt pushes no error code, even for the vector of #DF. */
    int $8
after_int8:
    mov $name_int8, %esi
    call puts
    mov int8_return, %rax
    cmp $after_int8, %rax
    jne 1f
    mov $text_ok, %esi
    jmp 2f
1:  mov $text_bad, %esi
2:  call puts

    /* Beyond the IDT limit: #GP with error code vector * 8 + 2 (IDT bit). */
    TRY name_int50, int $0x50
    call print_error_code

    xor %ecx, %ecx
    TRY name_rdpru, .byte 0x0f, 0x01, 0xfd
    call newline
    xor %ecx, %ecx
    TRY name_xgetbv, xgetbv
    call newline
    mov $invpcid_descriptor, %eax
    mov $2, %ecx /* all contexts, globals included */
    TRY name_invpcid, invpcid (%rax), %rcx
    call newline
    TRY name_clwb, clwb cx_memory
    call newline

    /* lock cmpxchg16b: equal (ZF=1, RCX:RBX stored), then unequal (ZF=0, memory loaded). */
    mov $1, %eax
    mov $2, %edx
    mov $3, %ebx
    mov $4, %ecx
    TRY name_cx_equal, lock cmpxchg16b cx_memory
    mov $text_bad, %esi
    testq $RFLAGS_ZF, flags_after
    jz 1f
    cmpq $3, cx_memory
    jne 1f
    cmpq $4, cx_memory + 8
    jne 1f
    mov $text_ok, %esi
1:  call puts
    mov $1, %eax
    mov $2, %edx
    mov $5, %ebx
    mov $6, %ecx
    TRY name_cx_unequal, lock cmpxchg16b cx_memory
    mov $text_bad, %esi
    testq $RFLAGS_ZF, flags_after
    jnz 1f
    cmpq $3, rax_after
    jne 1f
    cmpq $4, rdx_after
    jne 1f
    cmpq $3, cx_memory
    jne 1f
    mov $text_ok, %esi
1:  call puts
    TRY name_cx_misaligned, lock cmpxchg16b cx_memory + 8
    call print_error_code

    /* movbe: loads of 16, 32, 64 bits (a 16-bit load keeps RAX's bits 63:16, a 32-bit one
     * zero-extends), stores of 64 bits across a page and of 16 bits, then the register form. */
    mov $-1, %rax
    TRY name_movbe_load16, movbe movbe_memory, %ax
    EXPECT_RAX 0xffffffffffff0102
    mov $-1, %rax
    TRY name_movbe_load32, movbe movbe_memory, %eax
    EXPECT_RAX 0x01020304
    TRY name_movbe_load64, movbe movbe_memory, %rax
    EXPECT_RAX 0x0102030405060708
    movq $0, PAGE_CROSSING
    movabs $0x1122334455667788, %rax
    TRY name_movbe_store64, movbe %rax, PAGE_CROSSING
    mov $text_bad, %esi
    mov PAGE_CROSSING, %rcx
    movabs $0x8877665544332211, %rdx
    cmp %rdx, %rcx
    jne 1f
    mov $text_ok, %esi
1:  call puts
    movq $-1, movbe_store16
    mov $0xa1b2, %eax
    TRY name_movbe_store16, movbe %ax, movbe_store16
    mov $text_bad, %esi
    movabs $0xffffffffffffb2a1, %rdx
    cmp %rdx, movbe_store16
    jne 1f
    mov $text_ok, %esi
1:  call puts
    TRY name_movbe_register, .byte 0x0f, 0x38, 0xf0, 0xc0 /* mod = 3: #UD */
    call newline

    /* MMX with the x87 state in its initial configuration (after FNINIT): movq %rax, %mm0, then
     * %mm0 to memory and back into a register. On kvm_pvm the register moves are pyhv's and the
     * store is KVM's own emulator: the value must survive the XRSTOR between them. */
    mov %cr0, %rax
    and $~(CR0_EM | CR0_TS), %rax
    mov %rax, %cr0
    fninit
    movabs $0x0102030405060708, %rax
    TRY name_mmx_to_mm0, movq %rax, %mm0
    call newline
    movq $0, mmx_memory
    TRY name_mmx_store, movq %mm0, mmx_memory
    mov $text_bad, %esi
    movabs $0x0102030405060708, %rdx
    cmp %rdx, mmx_memory
    jne 1f
    mov $text_ok, %esi
1:  call puts
    xor %eax, %eax
    TRY name_mmx_from_mm0, movq %mm0, %rax
    EXPECT_RAX 0x0102030405060708
    emms

    movzbl (PARAM_EXIT_CODE), %eax
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
1:  hlt
    jmp 1b


/* set_gate: IDT entry %edi -> handler %eax, type/attributes %esi, selector KERNEL_CS. */
set_gate:
    shl $4, %edi
    add $idt, %edi
    mov %ax, (%rdi)
    movw $KERNEL_CS, 2(%rdi)
    movb $0, 4(%rdi)
    mov %sil, 5(%rdi)
    shr $16, %eax
    mov %ax, 6(%rdi)
    movq $0, 8(%rdi)
    ret

/* Faults resume at `resume`, recording the vector (and the error code of #GP). */
handler_ud:
    movq $6, last_vector
    jmp resume_after_fault
handler_gp:
    popq last_error_code
    movq $13, last_vector
resume_after_fault:
    push %rax
    mov resume, %rax
    mov %rax, 8(%rsp)
    pop %rax
    iretq
handler_8:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, int8_return
    pop %rax
    iretq
handler_40:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, int40_return
    pushf
    pop %rax
    mov %rax, int40_flags
    pop %rax
    mov $0x5678, %rbx
    iretq
handler_41:
    push %rax
    pushf
    pop %rax
    mov %rax, int41_flags
    pop %rax
    iretq

/* " EEEE": the error code of the last #GP, four hex digits. */
print_error_code:
    mov last_error_code, %eax
    shr $8, %eax
    call puthex8
    mov last_error_code, %eax
    call hex8
    jmp newline

newline:
    mov $'\n', %al
    jmp putc

/* puthex8: %al as two hex digits after a space; hex8: without the space. */
puthex8:
    push %rax
    mov $' ', %al
    call putc
    pop %rax
hex8:
    push %rax
    shr $4, %eax
    call puthex4
    pop %rax
puthex4:
    and $0xf, %eax
    mov hex_digits(%rax), %al
putc:
    push %rax
    mov $COM1_LSR, %dx
1:  in %dx, %al
    test $LSR_THRE, %al
    jz 1b
    pop %rax
    mov $COM1, %dx
    out %al, %dx
    ret

puts:
    lodsb
    test %al, %al
    jz 1f
    call putc
    jmp puts
1:  ret

GDT
    .p2align 4
idt_descriptor:
    .word IDT_VECTORS * 16 - 1
    .quad idt
    .p2align 4
cx_memory: .quad 1, 2
invpcid_descriptor: .quad 0, 0
movbe_memory: .byte 1, 2, 3, 4, 5, 6, 7, 8
movbe_store16: .quad 0
mmx_memory: .quad 0
resume: .quad 0
last_vector: .quad 0
last_error_code: .quad 0
flags_after: .quad 0
rax_after: .quad 0
rdx_after: .quad 0
int40_return: .quad 0
int40_flags: .quad 0
int41_flags: .quad 0
int8_return: .quad 0
hex_digits: .ascii "0123456789abcdef"
name_int40: .asciz "int 0x40"
name_int40_if: .asciz "int 0x40 if"
name_int41: .asciz "int 0x41 if"
name_int8: .asciz "int 8"
name_int50: .asciz "int 0x50"
name_rdpru: .asciz "rdpru"
name_xgetbv: .asciz "xgetbv"
name_invpcid: .asciz "invpcid"
name_clwb: .asciz "clwb"
name_cx_equal: .asciz "cmpxchg16b equal"
name_cx_unequal: .asciz "cmpxchg16b unequal"
name_cx_misaligned: .asciz "cmpxchg16b misaligned"
name_movbe_load16: .asciz "movbe load16"
name_movbe_load32: .asciz "movbe load32"
name_movbe_load64: .asciz "movbe load64"
name_movbe_store64: .asciz "movbe store64 across a page"
name_movbe_store16: .asciz "movbe store16"
name_movbe_register: .asciz "movbe register"
name_mmx_to_mm0: .asciz "mmx movq to mm0"
name_mmx_store: .asciz "mmx movq mm0 to memory"
name_mmx_from_mm0: .asciz "mmx movq from mm0"
text_ok: .asciz " ok\n"
text_bad: .asciz " bad\n"
    .p2align 4
idt: .fill IDT_VECTORS * 16, 1, 0
