/* Interrupt and exception entry for vfdrv: one 16-byte stub per vector (the IDT points at
 * irq_stubs + 16 * vector), entered through 32-bit interrupt gates, so IF is clear and the
 * frame is EIP, CS, EFLAGS (no ring change, no error code for vectors >= 32).
 *
 * This KVM runs the guest in its instruction emulator, which fails on iret. The handler
 * returns without it: pop EIP, drop CS, popfl an EFLAGS image with IF cleared, sti, jmp.
 * sti's one-instruction interrupt shadow covers the jmp, so a pending interrupt is taken
 * only at the interrupted instruction, on a stack that is back to its state before the
 * interrupt. Only vCPU 0 takes interrupts and handlers do not nest (IF stays clear), so the
 * return address can live in one fixed word: the last of vfdrv's low page (vfdrv.c, layout),
 * which also keeps the image free of writable sections. */
.section .note.GNU-stack,"",@progbits
.set irq_ret_eip, 0x6FFC
.text
.code32

.global irq_stubs
.balign 16
irq_stubs:
.set vec, 0
.rept 256
    .balign 16
    pushl $vec
    .if vec < 32
    jmp exc_common
    .else
    jmp irq_common
    .endif
    .set vec, vec + 1
.endr

/* Exceptions are bugs here (no paging, no user mode): report and stop this vCPU. An error
 * code, if the CPU pushed one, sits under the vector; it is not needed. */
exc_common:
    cld
    call vfdrv_exception        /* vector is the argument; does not return */
1:  cli
    hlt
    jmp 1b

irq_common:                     /* stack: vector, EIP, CS, EFLAGS */
    push %eax                   /* the C ABI's caller-saved registers */
    push %ecx
    push %edx
    cld
    pushl 12(%esp)
    call vfdrv_irq              /* acknowledges (EOI) the vector itself */
    add $4, %esp
    pop %edx
    pop %ecx
    pop %eax
    lea 4(%esp), %esp           /* drop the vector */
    popl irq_ret_eip
    lea 4(%esp), %esp           /* drop CS: flat, same segment */
    testl $0x200, (%esp)
    jz 2f
    andl $~0x200, (%esp)        /* IF off in the image: sti below turns it on with its shadow */
    popfl
    sti
    jmp *irq_ret_eip
2:  popfl                       /* interrupted with IF clear (not expected): leave it clear */
    jmp *irq_ret_eip
