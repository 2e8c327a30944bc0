/*
 * CPL0 handlers. They do as little as possible: faults are handed to a CPL3 reporter, interrupts are
 * recorded and acknowledged, and the int3 gate offers a few services that need CPL0.
 */
    .section .text.lks_handlers, "ax"
    .code64

/* ---- Exceptions 0..31: one stub per vector, {stub_stride} bytes apart ---- */
    .balign {stub_stride}
    .globl lks_exception_stubs
lks_exception_stubs:
    .set lks_vec, 0
    .rept 32
    .balign {stub_stride}
    .if ((({error_code_vectors}) >> lks_vec) & 1) == 0
    push $0                         /* no error code from the CPU: push one for a uniform frame */
    .endif
    push $lks_vec
    jmp lks_fault_common
    .set lks_vec, lks_vec + 1
    .endr

/*
 * Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. The first fault is recorded and its frame is
 * rewritten to continue in the CPL3 reporter on the fault stack; a fault while one is being reported
 * gives up with a triple fault (a reset).
 */
lks_fault_common:
    xor %eax, %eax
    mov $1, %ecx
    lock cmpxchg %ecx, {fault_taken}(%rip)
    jne lks_triple_fault
    pop %rax
    mov %rax, {fault_record}+0(%rip)        /* vector */
    pop %rax
    mov %rax, {fault_record}+8(%rip)        /* error code */
    mov 0(%rsp), %rax
    mov %rax, {fault_record}+16(%rip)       /* RIP */
    mov 8(%rsp), %rax
    mov %rax, {fault_record}+24(%rip)       /* CS */
    mov 24(%rsp), %rax
    mov %rax, {fault_record}+32(%rip)       /* RSP */
    mov %cr2, %rax
    mov %rax, {fault_record}+40(%rip)       /* CR2 */
    movq $lks_fault_user_entry, 0(%rsp)
    movq ${sel_user_code}, 8(%rsp)
    movq ${rflags_user}, 16(%rsp)
    movq $lks_fault_stack_top, 24(%rsp)
    movq ${sel_user_data}, 32(%rsp)
    iretq

lks_fault_user_entry:
    call {fault_main}
    ud2

/* ---- Device interrupts, vectors {irq_base}..{irq_base}+31: set a pending bit, EOI ---- */
    .balign {stub_stride}
    .globl lks_irq_stubs
lks_irq_stubs:
    .set lks_vec, 0
    .rept 32
    .balign {stub_stride}
    push %rax
    mov $lks_vec, %eax
    jmp lks_irq_common
    .set lks_vec, lks_vec + 1
    .endr

lks_irq_common:
    lock btsl %eax, {irq_pending}(%rip)
    mov ${lapic_eoi}, %eax
    movl $0, (%rax)
    pop %rax
    iretq

    .globl lks_spurious_interrupt
lks_spurious_interrupt:
    iretq

/* ---- The int3 service gate (DPL3): service number in EAX ---- */
    .globl lks_service_entry
lks_service_entry:
    cmp ${svc_wait}, %eax
    je 1f
    cmp ${svc_halt}, %eax
    je 2f
    cmp ${svc_triple_fault}, %eax
    je lks_triple_fault
    cmp ${svc_uart_write}, %eax
    je 4f
    cmp ${svc_kvmclock}, %eax
    je 10f
    mov $-1, %rax
    iretq
1:  /*
     * Wait for an interrupt, unless one was recorded since CPL3 last took the pending mask (a host
     * may deliver interrupts at CPL3 too). The STI shadow makes a pending one wake the HLT.
     */
    cmpl $0, {irq_pending}(%rip)
    jne 9f
    sti
    hlt
    cli
9:  iretq
2:  /* Halt for ever, still taking interrupts. */
    sti
3:  hlt
    jmp 3b
4:  /*
     * Transmit RCX bytes from RSI on the 8250 UART at base port DX, waiting for "THR empty" before
     * each 16-byte burst. On PVM a port access from CPL0 costs a fraction of one from CPL3.
     */
    test %rcx, %rcx
    jz 8f
5:  add $5, %dx                     /* line status register */
6:  inb %dx, %al
    test $0x20, %al
    jz 6b
    sub $5, %dx
    mov $16, %r8d
7:  movb (%rsi), %al
    outb %al, %dx
    inc %rsi
    dec %rcx
    jz 8f
    dec %r8d
    jnz 7b
    jmp 5b
8:  iretq
10: /*
     * Point this CPU's KVM clock at RSI (a pvclock structure's address, bit 0 set to enable), if
     * the VMM's CPUID (visible here, not at CPL3) says KVM with KVM_FEATURE_CLOCKSOURCE2: else the
     * WRMSR would fault. EAX = 1 if done, else 0. CPUID clobbers EBX, which Rust cannot declare.
     */
    push %rbx
    mov ${kvm_cpuid_base}, %eax
    cpuid
    cmp ${kvm_signature_ebx}, %ebx
    jne 11f
    mov ${kvm_cpuid_features}, %eax
    cpuid
    test ${kvm_feature_clocksource2}, %eax
    jz 11f
    mov ${msr_kvm_system_time}, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    mov $1, %eax
    pop %rbx
    iretq
11: xor %eax, %eax
    pop %rbx
    iretq

/*
 * Reset by triple fault: with an empty IDT, the #GP from a non-canonical access cannot be delivered,
 * nor can the double fault that follows. (INT3 and INT n cannot be used: PVM cannot emulate them at CPL0.)
 */
lks_triple_fault:
    lidt lks_null_idt_ptr(%rip)
    movabs $0x8000000000000000, %rax
    mov (%rax), %rax
    jmp lks_triple_fault

    .section .data.lks_idt_ptr, "aw"
    .balign 8
    .globl lks_idt_ptr
lks_idt_ptr:
    .word {idt_entries} * 16 - 1
    .quad {idt}
lks_null_idt_ptr:
    .word 0
    .quad 0
