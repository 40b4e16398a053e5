/*
 * The gdb stub's test guest: a CPL3 loop that writes one variable and reads another, then
 * writes its exit code to the debug-exit port.
 *
 * Why CPL3: on kvm_pvm hosts debug traps at emulated CPL0 may not arrive (shared/PLATFORM.md),
 * while user-mode code runs natively and takes #DB and #BP like on hardware virtualization.
 * The labels the tests break on sit at fixed addresses (.org), so a test needs no symbol file:
 *   0x1200 user_entry   rcx = 0
 *   0x1210 loop_top     rcx += 1 (the software breakpoint site)
 *   0x1220 write_site   COUNTER = rcx (a write watchpoint on COUNTER fires here)
 *   0x1230 read_site    rbx = SOURCE (the hardware breakpoint and read watchpoint site)
 *   0x1260 exit_site    out exit code to the debug-exit port
 *   0x1800 COUNTER, 0x1808 SOURCE (u64 each)
 * The loop runs `count` (parameter block, common.S) times, at CPL3 (mode 0) or, with mode 1,
 * at CPL0 (emulated on kvm_pvm), to show what each privilege level can do there.
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

#define COUNTER 0x1800
#define SOURCE 0x1808
#define MODE_KERNEL 1

    .text
    .globl _start
_start:
    PARAMETER_BLOCK start
start:
    ENTER_LONG_MODE
    cmpb $MODE_KERNEL, (PARAM_MODE)
    je user_entry
    ENTER_USER_MODE user_entry

    .org 0x200
user_entry: /* at CPL3 unless mode 1 */
    xor %ecx, %ecx
    jmp loop_top

    .org 0x210
loop_top:
    inc %rcx
    jmp write_site

    .org 0x220
write_site:
    mov %rcx, (COUNTER)
    jmp read_site

    .org 0x230
read_site:
    mov (SOURCE), %rbx
    cmp (PARAM_COUNT), %rcx
    jb loop_top
    jmp exit_site

    .org 0x260
exit_site:
    movzbl (PARAM_EXIT_CODE), %eax
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
1:  jmp 1b

GDT

    .org 0x800
counter: .quad 0
source: .quad 0x1122334455667788
