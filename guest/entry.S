/* Entry for every vCPU: the VMM starts each one here in 32-bit flat protected mode
.section .note.GNU-stack,"",@progbits
 * with %esi = vCPU id. Each gets its own stack below 0x80000. */
.section .text.entry
.global _start
.code32
_start:
    mov %esi, %eax
    shl $14, %eax
    mov $0x80000, %esp
    sub %eax, %esp
    push %esi
    call guest_main
1:  cli
    hlt
    jmp 1b
