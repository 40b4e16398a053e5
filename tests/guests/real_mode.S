/*
 * Real-mode test guest: greets on COM1, then writes its exit code (parameter byte 2) to the
 * debug-exit port. Mode 1: spin forever instead (for --timeout tests).
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

    .text
    .code16
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $STACK_TOP, %sp
    mov $greeting, %si
    call puts16
    cmpb $1, (PARAM_MODE)
    je spin
    mov (PARAM_EXIT_CODE), %al
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
    hlt
spin:
    jmp spin

REAL_MODE_PUTS_FUNCTION

greeting: .asciz "hello from real mode\n"
