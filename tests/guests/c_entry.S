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

    .section .text.entry, "ax"
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    ENTER_LONG_MODE
    ENTER_USER_MODE user_entry
user_entry:
    mov $USER_DS | 3, %ax
    mov %ax, %ds
    mov %ax, %es
    call main
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
1:  jmp 1b

GDT
