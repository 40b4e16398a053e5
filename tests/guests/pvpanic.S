/*
 * Real-mode test guest for the pvpanic port (QEMU docs/specs/pvpanic.rst, ISA interface), as a
 * kernel's pvpanic driver uses it. By mode (parameter byte 3):
 *   0: write PVPANIC_PANICKED (1) to the port, then the exit code to the debug-exit port; pyhv
 *      must end the run at the first write (a panic), so the exit code only shows if it did not
 *   1: write PVPANIC_CRASH_LOADED (2) -- a kdump kernel takes over, the run goes on -- then the
 *      exit code to the debug-exit port
 *   2: read the port (the events the device supports) and write what it read to the debug-exit
 *      port, so the run's exit status is the bitmap
 *   3: no pvpanic at all: print a line starting "Kernel panic - not syncing" on COM1, then reset
 *      through the i8042 (0xfe to port 0x64). Not a Linux guest, so the console rule must not
 *      turn that reset into a panic (issue 9's 59-byte guest)
 * The pvpanic port is the `port` parameter (0: the default 0x505).
 */
#ifndef EXIT_CODE
#define EXIT_CODE 0
#endif
#include "common.S"

#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 0x1
#define PVPANIC_CRASH_LOADED 0x2
#define I8042_COMMAND 0x64
#define I8042_PULSE_RESET 0xfe /* pulse output line 0 (the CPU reset line) */

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
    mov (PARAM_PORT), %dx
    test %dx, %dx
    jnz 1f
    mov $PVPANIC_PORT, %dx
1:  movb (PARAM_MODE), %bl
    cmp $2, %bl
    je read_events
    cmp $3, %bl
    je fake_panic_line
    mov $PVPANIC_PANICKED, %al
    cmp $1, %bl
    jne 2f
    mov $PVPANIC_CRASH_LOADED, %al
2:  out %al, %dx
    mov (PARAM_EXIT_CODE), %al
    jmp exit
read_events:
    in %dx, %al
exit:
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
spin:
    hlt
    jmp spin

fake_panic_line:
    mov $panic_line, %si
    call puts16
    mov $I8042_PULSE_RESET, %al
    out %al, $I8042_COMMAND
    jmp spin

REAL_MODE_PUTS_FUNCTION

panic_line: .asciz "Kernel panic - not syncing: not a Linux guest\n"
