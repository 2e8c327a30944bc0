/*
 * Prebuilt CPU tables, so that the emulated CPL0 start-up only has to load them: the GDT, one TSS per
 * CPU sharing one I/O-permission bitmap, and page tables identity-mapping 0..4 GiB with 2 MiB pages.
 * The IDT lives in Rust (cpu::idt) and is filled at CPL3 before anything can fault.
 */

/* ---- Page tables: PML4 -> one PDPT -> four PDs; every page user-accessible and writable ---- */
    .section .data.lks_pagetables, "aw"
    .balign 4096
    .globl lks_pml4
lks_pml4:
    .quad lks_pdpt + {pte_table}
    .fill 511, 8, 0
    .globl lks_pdpt
lks_pdpt:
    .quad lks_pd + 0x0000 + {pte_table}
    .quad lks_pd + 0x1000 + {pte_table}
    .quad lks_pd + 0x2000 + {pte_table}
    .quad lks_pd + 0x3000 + {pte_table}
    .fill 508, 8, 0
lks_pd:
    /* 0..3 GiB: RAM, write-back. */
    .set lks_addr, 0
    .rept 1536
    .quad lks_addr + {pte_large}
    .set lks_addr, lks_addr + 0x200000
    .endr
    /* 3..4 GiB: the MMIO hole (LAPIC, IOAPIC, virtio-mmio windows), uncached. */
    .rept 512
    .quad lks_addr + {pte_large_uncached}
    .set lks_addr, lks_addr + 0x200000
    .endr

/* ---- GDT ---- */
    .section .data.lks_gdt, "aw"
    .balign 16
    .globl lks_gdt
lks_gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00cf9b000000ffff        /* 0x08 kernel code, 32-bit, flat */
    .quad 0x00af9b000000ffff        /* 0x10 kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* 0x18 kernel data, flat */
    .quad 0x00cff3000000ffff        /* 0x20 user data, DPL3 */
    .quad 0x00affb000000ffff        /* 0x28 user code, 64-bit, DPL3 */
    .fill {max_cpus} * 2, 8, 0      /* 0x30.. one 16-byte TSS descriptor per CPU, built at start-up */
lks_gdt_end:
    .balign 8
    .globl lks_gdt_ptr
lks_gdt_ptr:
    .word lks_gdt_end - lks_gdt - 1
    .quad lks_gdt

/* ---- TSSs (104 bytes each) and the shared I/O bitmap, which allows every port ---- */
    .balign 16
    .globl lks_tss
lks_tss:
    .set lks_cpu, 0
    .rept {max_cpus}
    .long 0                                             /* reserved */
    .quad lks_kstacks + (lks_cpu + 1) * {kstack_size}   /* RSP0 */
    .quad 0, 0                                          /* RSP1, RSP2 */
    .quad 0                                             /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0                           /* IST1..IST7 */
    .quad 0                                             /* reserved */
    .word 0                                             /* reserved */
    .word lks_io_bitmap - (lks_tss + lks_cpu * {tss_size})  /* I/O map base */
    .set lks_cpu, lks_cpu + 1
    .endr
lks_io_bitmap:
    .fill 8192, 1, 0
    .byte 0xff
    .globl lks_io_bitmap_end
lks_io_bitmap_end:

/* The next CPU index an AP takes (the BSP is 0). */
    .balign 4
    .globl lks_ap_next_index
lks_ap_next_index:
    .long 1

/* ---- Stacks: never zeroed, never part of the file ---- */
    .section .lks_noinit, "aw", @nobits
    .balign 4096
    .globl lks_kstacks
lks_kstacks:
    .fill {max_cpus} * {kstack_size}, 1, 0
    .globl lks_ustacks
lks_ustacks:
    .fill {max_cpus} * {ustack_size}, 1, 0
    .globl lks_fault_stack_top
lks_fault_stack:
    .fill {fault_stack_size}, 1, 0
lks_fault_stack_top:
