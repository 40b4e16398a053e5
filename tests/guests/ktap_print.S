/*
 * Real-mode test guest for `pyhv kunit`: prints on COM1 the NUL-terminated text a test put in
 * the image (its linear address, below 1 MiB, in the parameter block's count field), as a KUnit
 * kernel prints KTAP on its console, then ends as the mode byte says:
 *   0  writes its exit code to the debug-exit port
 *   1  spins forever (a hung test: only --timeout ends it)
 *   2  triple-faults (a crash mid-test): an empty IDT, protected mode on, ud2; the #UD, the #GP
 *      and the #DF that follow cannot be delivered (SDM Vol. 3 §6.15, interrupt 8)
 *   3  resets through the i8042 (what kunit_shutdown=reboot with reboot=k ends in)
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

#define I8042_COMMAND 0x64
#define I8042_PULSE_RESET 0xfe

    .text
    .code16
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    cli
    xor %ax, %ax
    mov %ax, %ss
    mov $STACK_TOP, %sp
    mov %ax, %ds
    /* DS:SI = the text's linear address, as segment (address >> 4) and offset (address & 15). */
    mov (PARAM_COUNT), %ebx
    mov %bx, %si
    and $0xf, %si
    shr $4, %ebx
    mov %bx, %ds
    call puts16
    xor %ax, %ax
    mov %ax, %ds
    movb (PARAM_MODE), %al
    cmp $1, %al
    je spin
    cmp $2, %al
    je triple_fault
    cmp $3, %al
    je reset
    mov (PARAM_EXIT_CODE), %al
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
    hlt
spin:
    jmp spin
triple_fault:
    lidt empty_idt
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ud2
    hlt
reset:
    mov $I8042_PULSE_RESET, %al
    out %al, $I8042_COMMAND
    hlt

REAL_MODE_PUTS_FUNCTION

    .p2align 3
empty_idt:
    .word 0
    .long 0
