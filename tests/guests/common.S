/*
 * Shared pieces of pyhv's test guests (GNU as, AT&T syntax).
 *
 * Every guest is a flat binary linked at GUEST_BASE (0x1000) and entered in real mode at
 * CS=0, IP=0x1000 (`pyhv run --raw guest.bin@0x1000`). Its first 16 bytes are a parameter
 * block that tests patch in the binary or in guest memory (see tests/guests/build.py):
 *   0x00 short jmp to the code
 *   0x02 u8  exit code written to the debug-exit port at the end
 *   0x03 u8  mode (guest specific)
 *   0x04 u16 port (guest specific)
 *   0x08 u64 count / address (guest specific)
 */
#define GUEST_BASE 0x1000
#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define DEBUG_EXIT_PORT 0x501

#define PARAM_EXIT_CODE (GUEST_BASE + 2)
#define PARAM_MODE (GUEST_BASE + 3)
#define PARAM_PORT (GUEST_BASE + 4)
#define PARAM_COUNT (GUEST_BASE + 8)

/* Page tables and GDT for the long-mode guests (Intel SDM vol. 3A §4.5 4-level paging). */
#define PML4 0x8000
#define PDPT 0x9000
#define PD0 0xa000 /* four page directories, 0xa000-0xdfff: 2 MiB pages for the low 4 GiB */
#define STACK_TOP 0x7000
#define USER_STACK_TOP 0x6000

#define PAGE_PRESENT 0x1
#define PAGE_WRITE 0x2
#define PAGE_USER 0x4
#define PAGE_SIZE_2M 0x80

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x18
#define USER_CS 0x20

.macro PARAMETER_BLOCK start_label
    .code16
    jmp \start_label
    .org 2
exit_code: .byte EXIT_CODE
mode: .byte 0
port: .word 0
    .org 8
count: .quad 0
.endm

/* Real mode: print the NUL-terminated string at %si on COM1, polling LSR.THRE. */
.macro REAL_MODE_PUTS_FUNCTION
puts16:
    mov $COM1_LSR, %dx
1:  in %dx, %al
    test $LSR_THRE, %al
    jz 1b
    lodsb
    test %al, %al
    jz 2f
    mov $COM1, %dx
    out %al, %dx
    jmp puts16
2:  ret
.endm

#define MMIO_BASE 0xd0000000 /* in the 32-bit MMIO hole, never guest RAM */

/*
 * Real mode straight to 64-bit long mode (SDM vol. 3A §9.8.5: PAE and LME set, then PE and PG
 * together), with identity-mapped 2 MiB pages for the low 4 GiB, user-accessible so that the
 * CPL3 guest can run on them. Continues at `long_entry` in 64-bit mode, CPL0, flat segments.
 */
.macro ENTER_LONG_MODE
    .code16
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $STACK_TOP, %sp
    cld
    mov $PML4, %di
    xor %eax, %eax
    mov $(6 * 4096 / 4), %cx
    rep stosl
    movl $(PDPT | PAGE_PRESENT | PAGE_WRITE | PAGE_USER), (PML4)
    movl $(PD0 | PAGE_PRESENT | PAGE_WRITE | PAGE_USER), (PDPT)
    movl $((PD0 + 0x1000) | PAGE_PRESENT | PAGE_WRITE | PAGE_USER), (PDPT + 8)
    movl $((PD0 + 0x2000) | PAGE_PRESENT | PAGE_WRITE | PAGE_USER), (PDPT + 16)
    movl $((PD0 + 0x3000) | PAGE_PRESENT | PAGE_WRITE | PAGE_USER), (PDPT + 24)
    mov $PD0, %di
    mov $(PAGE_PRESENT | PAGE_WRITE | PAGE_USER | PAGE_SIZE_2M), %eax
    mov $2048, %cx
1:  mov %eax, (%di)
    add $8, %di
    add $0x200000, %eax
    loop 1b
    lgdtl gdt_descriptor
    mov $PML4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $(CR0_PE | CR0_PG), %eax
    mov %eax, %cr0
    ljmpl $KERNEL_CS, $long_entry
    .code64
long_entry:
    mov $KERNEL_DS, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $STACK_TOP, %rsp
.endm

/*
 * From CPL0 long mode to CPL3 at `target` with IOPL=3, through iretq (SDM vol. 3A §6.14.3: SS,
 * RSP, RFLAGS, CS, RIP). IOPL=3 lets user mode use in/out directly (SDM vol. 1 §18.5.1).
 */
#define RFLAGS_IOPL3 0x3000
#define RFLAGS_RESERVED 0x2
.macro ENTER_USER_MODE target
    pushq $(USER_DS | 3)
    pushq $USER_STACK_TOP
    pushq $(RFLAGS_IOPL3 | RFLAGS_RESERVED)
    pushq $(USER_CS | 3)
    pushq $\target
    iretq
.endm

.macro GDT
    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff /* 0x10: data, DPL 0 */
    .quad 0x00cff2000000ffff /* 0x18: data, DPL 3 */
    .quad 0x00affa000000ffff /* 0x20: 64-bit code, DPL 3 */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt
.endm

/*
 * What both 64-bit guests do, by mode (parameter byte 3):
 *   0: greet, then an MMIO exchange at MMIO_BASE: write the u32 0x12345678 at +0, read a u64
 *      at +8 and write it back at +16; then exit
 *   1: spin forever (kick and timeout tests)
 *   2: write AL to `port` forever (the exit-overhead benchmark)
 *   3: write AL to `port` `count` times, then exit
 *   4: write a u32 at MMIO_BASE `count` times, then exit
 *   5: a 32-bit in and out at `port`, `count` times each, then exit
 *   6: SMP count: wait at the gate (below), then write the u32 TAG + i to `port` with a 32-bit
 *      out for i = `count` down to 1, then spin (no exit: the other vCPUs finish their own)
 *   7: SMP forever: wait at the gate, then write the u32 TAG to `port` forever. With a nonzero
 *      `count`, every vCPU but the one with APIC ID 0 writes TAG `count` times and then
 *      executes ud2, which with no IDT (its entries are zero) escalates to a triple fault on
 *      that vCPU alone: #UD, #GP for the invalid gate, #DF, shutdown (SDM Vol. 3A §6.15, int 8)
 * and exit = write the exit code byte to the debug-exit port.
 *
 * The SMP modes (6, 7) are run by every vCPU: the test starts the others with the boot vCPU's
 * registers while it waits at the gate. The gate is a 32-bit in from `port` repeated while it
 * reads 0 (the test's device opens it); then each vCPU takes TAG = its local APIC ID register
 * (xAPIC MMIO at LAPIC_ID, the ID in bits 31:24, SDM Vol. 3A §11.4.6), so with `count` below
 * 2^24 each value says which vCPU wrote it. The loops use no stack: the vCPUs share it.
 */
#define LAPIC_ID 0xfee00020
/* The SMP modes' gate (see GUEST_BODY): leaves `port` in %edx and the vCPU's TAG in %ebx. */
.macro SMP_GATE
    movzwl (PARAM_PORT), %edx
1:  in %dx, %eax
    test %eax, %eax
    jz 1b
    mov $LAPIC_ID, %ebx /* an absolute disp32 would sign-extend: through a register */
    mov (%rbx), %ebx
    and $0xff000000, %ebx
.endm

.macro GUEST_BODY greeting
    mov $\greeting, %esi
    call puts64
    movzbl (PARAM_MODE), %eax
    cmp $1, %eax
    je spin
    cmp $2, %eax
    je out_forever
    cmp $3, %eax
    je out_count
    cmp $4, %eax
    je mmio_count
    cmp $5, %eax
    je pio_wide_count
    cmp $6, %eax
    je smp_count
    cmp $7, %eax
    je smp_forever
    mov $MMIO_BASE, %ebx
    movl $0x12345678, (%rbx)
    mov 8(%rbx), %rax
    mov %rax, 16(%rbx)
    jmp exit
spin:
    jmp spin
out_forever:
    movzwl (PARAM_PORT), %edx
1:  out %al, %dx
    jmp 1b
out_count:
    movzwl (PARAM_PORT), %edx
    mov (PARAM_COUNT), %rcx
1:  out %al, %dx
    dec %rcx
    jnz 1b
    jmp exit
mmio_count:
    mov $MMIO_BASE, %ebx
    mov (PARAM_COUNT), %rcx
1:  movl %ecx, (%rbx)
    dec %rcx
    jnz 1b
pio_wide_count:
    /* 4-byte in and out at PARAM_PORT, PARAM_COUNT times each; exit 0x7e if an in did not
     * read all-ones (what an access with no device behind it returns). */
    movzwl (PARAM_PORT), %edx
    mov (PARAM_COUNT), %rcx
1:  in %dx, %eax
    cmp $0xffffffff, %eax
    jne 2f
    out %eax, %dx
    dec %rcx
    jnz 1b
    jmp exit
2:  mov $0x7e, %al
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
    jmp spin
smp_count:
    SMP_GATE
    mov (PARAM_COUNT), %rcx
1:  lea (%rbx,%rcx), %eax
    out %eax, %dx
    dec %rcx
    jnz 1b
    jmp spin
smp_forever:
    SMP_GATE
    mov %ebx, %eax
    mov (PARAM_COUNT), %rcx
    test %ebx, %ebx
    jz 1f
    test %rcx, %rcx
    jnz 2f
1:  out %eax, %dx
    jmp 1b
2:  out %eax, %dx /* not the boot vCPU, and a count: write, then fault */
    dec %rcx
    jnz 2b
    ud2
exit:
    movzbl (PARAM_EXIT_CODE), %eax
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
    jmp spin

puts64:
    mov $COM1_LSR, %dx
1:  in %dx, %al
    test $LSR_THRE, %al
    jz 1b
    lodsb
    test %al, %al
    jz 2f
    mov $COM1, %dx
    out %al, %dx
    jmp puts64
2:  ret
.endm
