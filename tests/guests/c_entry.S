/*
 * Entry code of the freestanding C test guests: the parameter block, real mode to long mode,
 * then CPL3 with IOPL=3 (see user_mode.S for why), `call main`, and main's return value to the
 * debug-exit port. C guests keep their code and data below USER_STACK_TOP - 4 KiB and put
 * larger buffers at fixed addresses of their own above 0x10000.
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

#define RFLAGS_IOPL3 0x3000
#define RFLAGS_RESERVED 0x2

    .section .text.entry, "ax"
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    ENTER_LONG_MODE
    pushq $(USER_DS | 3)
    pushq $USER_STACK_TOP
    pushq $(RFLAGS_IOPL3 | RFLAGS_RESERVED)
    pushq $(USER_CS | 3)
    pushq $user_entry
    iretq
user_entry:
    mov $USER_DS | 3, %ax
    mov %ax, %ds
    mov %ax, %es
    call main
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
1:  jmp 1b

GDT
