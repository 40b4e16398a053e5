/*
 * 64-bit test guest whose body runs at CPL3 with IOPL=3 (modes: see GUEST_BODY in common.S).
 *
 * Why: on kvm_pvm hosts guest CPL0 code is emulated (~600 ns an instruction) while CPL3 code
 * runs natively (shared/PLATFORM.md), so benchmarks and loops belong in user mode. IOPL=3 lets
 * user mode use in/out directly (SDM vol. 1 §18.5.1); the pages carry the U bit. The same guest
 * runs unchanged under hardware virtualization.
 */
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
    ENTER_USER_MODE user_entry
user_entry:
    GUEST_BODY greeting

GDT
greeting: .asciz "hello from user mode\n"
