//! Deliberate exceptions at CPL3, so tests can check that a guest bug is reported
//! (`LKS fault vector=...`) and ends the VM instead of hanging it.

use core::arch::asm;

/// Reads an address no page table maps (1 TiB): #PF, vector 14.
pub fn page_fault() {
    crate::phys::read_u8(1 << 40);
}

/// Executes CLI, which CPL3 may not (IOPL is 0): #GP, vector 13.
pub fn general_protection() {
    // SAFETY: CLI at CPL3 faults before it changes anything; the fault reporter resets the machine.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Executes UD2: #UD, vector 6.
pub fn invalid_opcode() {
    // SAFETY: UD2 only raises #UD; the fault reporter resets the machine.
    unsafe { asm!("ud2", options(nomem, nostack)) };
}

/// Divides by zero with DIV: #DE, vector 0.
pub fn divide_error() {
    // SAFETY: DIV by zero faults before writing RAX/RDX; the fault reporter resets the machine.
    unsafe {
        asm!("xor ecx, ecx", "div ecx", out("eax") _, out("edx") _, out("ecx") _, options(nomem, nostack))
    };
}
