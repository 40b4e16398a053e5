/*
 * Multiboot (v1) test kernel: an ELF32 entered in 32-bit protected mode (Multiboot 0.6.96
 * §3.2). It checks EAX holds the bootloader magic, prints a greeting and the command line from
 * the multiboot information (EBX) on COM1, and exits through the debug-exit port with 0, or
 * with 1 when the magic or the info flags are wrong.
 */
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0x501
#define MULTIBOOT_HEADER_MAGIC 0x1BADB002
#define MULTIBOOT_HEADER_FLAGS 0x00000000 /* no requirements: the ELF headers say where to load */
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002
#define INFO_FLAGS 0
#define INFO_FLAG_MEMORY 0x1
#define INFO_FLAG_CMDLINE 0x4
#define INFO_CMDLINE 16

    .text
    .code32
    .globl _start
_start:
    jmp start
    .p2align 2
multiboot_header:
    .long MULTIBOOT_HEADER_MAGIC
    .long MULTIBOOT_HEADER_FLAGS
    .long -(MULTIBOOT_HEADER_MAGIC + MULTIBOOT_HEADER_FLAGS)
start:
    mov %ebx, %edi
    cmp $MULTIBOOT_BOOTLOADER_MAGIC, %eax
    jne fail
    mov $greeting, %esi
    call puts
    mov INFO_FLAGS(%edi), %eax
    test $INFO_FLAG_MEMORY, %eax
    jz fail
    test $INFO_FLAG_CMDLINE, %eax
    jz fail
    mov $cmdline_label, %esi
    call puts
    mov INFO_CMDLINE(%edi), %esi
    call puts
    mov $newline, %esi
    call puts
    xor %al, %al
    jmp exit
fail:
    mov $1, %al
exit:
    mov $DEBUG_EXIT_PORT, %dx
    out %al, %dx
1:  jmp 1b

puts:
    lodsb
    test %al, %al
    jz 2f
    mov $COM1, %dx
    out %al, %dx
    jmp puts
2:  ret

greeting: .asciz "hello from multiboot\n"
cmdline_label: .asciz "cmdline: "
newline: .asciz "\n"
