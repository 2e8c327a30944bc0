/*
 * AP start-up. The BSP copies lks_trampoline_start..lks_trampoline_end to a free page below 1 MiB and
 * sends INIT-SIPI-SIPI with that page. Each AP starts there in real mode (CS = page >> 4, IP = 0),
 * loads the kit's GDT, turns on protection and jumps to lks_ap_entry32, which goes on to long mode
 * through the same code as the PVH entry and then to CPL3 on the AP's own stacks.
 */
    .section .text.lks_trampoline, "ax"
    .code16
    .globl lks_trampoline_start
lks_trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (lks_trampoline_gdt_ptr - lks_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl ${sel_code32}, $lks_ap_entry32
    .balign 8
lks_trampoline_gdt_ptr:
    .word {gdt_limit}
    .long lks_gdt
    .globl lks_trampoline_end
lks_trampoline_end:

    .code32
lks_ap_entry32:
    mov ${sel_data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov ${kind_ap}, %edi
    jmp lks_pm32_to_long
    .code64
