/*
 * Boot entries of every lockstep test guest, and the way from them to CPL3.
 *
 * Everything here runs at CPL0, which a PVM host emulates instruction by instruction: keep it short,
 * scalar (no SSE) and free of loops. The tables it loads are prebuilt (cpu/tables.s) or filled later
 * by Rust code at CPL3.
 *
 * Register convention from the entries to lks_start64: EDI = boot kind, ESI = boot-info pointer.
 */

/* ---- 0x100000: 32-bit entry (PVH, and the Linux 32-bit boot protocol through code32_start) ---- */
    .section .text.lks_entry32, "ax"
    .code32
    .globl lks_entry32
lks_entry32:
    cli
    /* PVH passes hvm_start_info in EBX; the Linux 32-bit protocol has EBX = 0 and boot_params in ESI. */
    cmpl ${pvh_magic}, (%ebx)
    jne 1f
    mov ${kind_pvh}, %edi
    mov %ebx, %esi
    jmp lks_pm32_to_long
1:  mov ${kind_linux32}, %edi
    /* fall through */

/* Protected mode (paging off, flat data segments) to long mode. Shared with the AP start-up path. */
    .globl lks_pm32_to_long
lks_pm32_to_long:
    lgdt lks_gdt_ptr
    ljmp ${sel_code32}, $2f
2:  mov ${sel_data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov ${cr4_value}, %eax
    mov %eax, %cr4
    mov $lks_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* IA32_EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov ${cr0_value}, %eax
    mov %eax, %cr0
    ljmp ${sel_code64}, $lks_start64

/* ---- 0x100200: 64-bit entry (Linux x86-64 boot protocol; RSI = boot_params) ---- */
    .section .text.lks_entry64, "ax"
    .code64
    .globl lks_entry64
lks_entry64:
    cli
    mov ${kind_linux64}, %edi
    lgdt lks_gdt_ptr(%rip)
    mov $lks_pml4, %eax
    mov %rax, %cr3
    mov ${cr4_value}, %eax
    mov %rax, %cr4
    mov ${cr0_value}, %eax
    mov %rax, %cr0
    /* The protocol gives no stack: use CPU 0's CPL0 stack to reload CS. */
    mov $(lks_kstacks + {kstack_size}), %esp
    push ${sel_code64}
    push $lks_start64
    lretq

/* ---- Common 64-bit path: CS is our 64-bit code segment, CR0/CR3/CR4/EFER are ours ---- */
    .section .text.lks_start, "ax"
    .code64
lks_start64:
    mov ${sel_data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    cmp ${kind_ap}, %edi
    je 1f
    /* BSP: CPU index 0, enters Rust with EDI = boot kind, RSI = boot info. */
    mov $(lks_kstacks + {kstack_size}), %esp
    xor %r12d, %r12d
    mov $lks_bsp_user_entry, %r13d
    jmp lks_enter_user
1:  /* AP: take the next CPU index; enters Rust with EDI = index. */
    mov $1, %r12d
    lock xadd %r12d, lks_ap_next_index(%rip)
    cmp ${max_cpus}, %r12d
    jae lks_park
    lea 1(%r12), %eax
    imul ${kstack_size}, %eax
    add $lks_kstacks, %eax
    mov %rax, %rsp
    mov %r12d, %edi
    mov $lks_ap_user_entry, %r13d
    jmp lks_enter_user

/* A CPU that cannot be given an index stays halted with interrupts off. */
lks_park:
    hlt
    jmp lks_park

/*
 * Per-CPU set-up and the drop to CPL3. In: R12 = CPU index, R13 = CPL3 entry; RDI/RSI are passed on.
 * Builds this CPU's TSS descriptor (the base must be split into fields, which the linker cannot do),
 * loads TR and the IDT, then IRETQs to CPL3 with interrupts off on the CPU's own user stack.
 */
lks_enter_user:
    imul ${tss_size}, %r12, %rbx
    add $lks_tss, %rbx                  /* RBX = TSS base */
    mov $(lks_io_bitmap_end - 1), %ecx
    sub %ebx, %ecx                      /* RCX = TSS limit, covers the I/O bitmap and its end byte */
    mov %rbx, %rax
    shl $16, %rax
    movabs $0xffffff0000, %rdx
    and %rdx, %rax                      /* base[23:0] -> bits 16..39 */
    or %rcx, %rax                       /* limit[15:0] */
    movabs $0x0000890000000000, %rdx    /* present, available 64-bit TSS */
    or %rdx, %rax
    mov %rbx, %rdx
    shr $24, %rdx
    shl $56, %rdx                       /* base[31:24] -> bits 56..63 */
    or %rdx, %rax
    mov %r12, %rdx
    shl $4, %rdx
    mov %rax, (lks_gdt + {sel_tss})(%rdx)
    add ${sel_tss}, %edx
    ltr %dx
    lidt lks_idt_ptr(%rip)
    lea 1(%r12), %eax
    imul ${ustack_size}, %eax
    add $lks_ustacks, %eax
    push ${sel_user_data}
    push %rax
    push ${rflags_user}
    push ${sel_user_code}
    push %r13
    iretq

/* ---- CPL3 entries into Rust ---- */
lks_bsp_user_entry:
    mov %rdi, %r12
    mov %rsi, %r13
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov %r12, %rdi
    mov %r13, %rsi
    call {bsp_main}
    ud2

lks_ap_user_entry:
    call {ap_main}
    ud2

/* ---- PVH ELF note: Xen's XEN_ELFNOTE_PHYS32_ENTRY (18) names the 32-bit entry ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size, "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long lks_entry32
