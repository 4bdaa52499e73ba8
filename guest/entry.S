/* Entry for every vCPU. Two loaders start us here in 32-bit flat protected mode:
 *  - the vfmig micro-VMM, with %esi = vCPU id and boot parameters already at 0x2000;
 *  - a multiboot loader (QEMU -kernel, for the baseline), with %eax = 0x2BADB002 and
 *    %ebx = the multiboot info; then vCPU 0 writes default boot parameters itself. */
.section .note.GNU-stack,"",@progbits
.section .text.entry
.global _start
.code32
_start:
    jmp 2f
    .align 4
multiboot_header:
    .long 0x1BADB002            /* magic */
    .long 0x00000002            /* flags: give us the memory map (mem_upper) */
    .long -(0x1BADB002 + 0x00000002)
2:  cmp $0x2BADB002, %eax
    jne 3f
    xor %esi, %esi
    mov $0x80000, %esp
    push %ebx
    call multiboot_setup
    add $4, %esp
3:  mov %esi, %eax
    shl $14, %eax
    mov $0x80000, %esp
    sub %eax, %esp
    push %esi
    call guest_main
1:  cli
    hlt
    jmp 1b
