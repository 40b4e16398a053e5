/* 64-bit long-mode test guest running at CPL0 (modes: see GUEST_BODY in common.S). */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

    .text
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    ENTER_LONG_MODE
    GUEST_BODY greeting

GDT
greeting: .asciz "hello from long mode\n"
