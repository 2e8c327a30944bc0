//! CPU set-up shared by every CPU: the layout constants the start-up assembly is built with, the IDT
//! (filled at CPL3), the int3 service gate into CPL0 (wait, halt, reset, UART output, KVM clock),
//! and the CPL3 fault reporter.
//!
//! The prebuilt tables live in `tables.s`, the CPL0 handlers in `handlers.s`.

pub mod fault;
pub mod paging;

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most CPUs the kit brings up; each has its own TSS, CPL0 stack and CPL3 stack.
pub const MAX_CPUS: usize = 32;
/// Size of each CPU's CPL0 stack (only the small assembly handlers run on it).
pub const KSTACK_SIZE: usize = 4096;
/// Size of each CPU's CPL3 stack, where all Rust code runs.
pub const USTACK_SIZE: usize = 64 * 1024;
/// Size of the stack the fault reporter runs on.
pub const FAULT_STACK_SIZE: usize = 16 * 1024;
/// Size of one 64-bit TSS.
pub const TSS_SIZE: usize = 104;

/// GDT selectors.
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit kernel code segment.
pub const SEL_CODE64: u16 = 0x10;
/// Kernel data segment.
pub const SEL_DATA: u16 = 0x18;
/// User data segment (RPL 3).
pub const SEL_USER_DATA: u16 = 0x23;
/// User 64-bit code segment (RPL 3).
pub const SEL_USER_CODE: u16 = 0x2b;
/// First TSS descriptor; CPU n's is at `SEL_TSS + 16 * n`.
pub const SEL_TSS: u16 = 0x30;

/// RFLAGS at CPL3: interrupts off (they are taken only while waiting in CPL0), IOPL 0.
const RFLAGS_USER: u64 = 0x2;
/// CR0: paging, numeric errors, extension type, monitor coprocessor, protection (no EM, no TS: SSE on).
const CR0_VALUE: u64 = 0x8000_0033;
/// CR4: PAE, OSFXSR and OSXMMEXCPT (SSE usable by compiled Rust at CPL3).
const CR4_VALUE: u64 = 0x620;

/// Vector of the first device interrupt; 32 vectors from here set bits in the pending mask.
pub const IRQ_BASE: u8 = 0x20;
/// Vector the local APIC uses for spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Physical address of the local APIC's EOI register (xAPIC mode at the default base).
pub const LAPIC_EOI: u64 = 0xfee0_00b0;

const IDT_ENTRIES: usize = 256;
const STUB_STRIDE: usize = 16;
/// Exceptions for which the CPU pushes an error code: 8, 10-14, 17, 21, 29, 30.
const ERROR_CODE_VECTORS: u32 =
    (1 << 8) | (0x1f << 10) | (1 << 17) | (1 << 21) | (1 << 29) | (1 << 30);
const BREAKPOINT_VECTOR: usize = 3;
const PAGE_FAULT_VECTOR: u64 = 14;

const SVC_WAIT: u32 = 1;
const SVC_HALT: u32 = 2;
const SVC_TRIPLE_FAULT: u32 = 3;
const SVC_UART_WRITE: u32 = 4;
const SVC_KVMCLOCK: u32 = 5;

/// CPUID leaf with the hypervisor's signature; KVM's starts "KVMK" in EBX.
const KVM_CPUID_BASE: u32 = 0x4000_0000;
const KVM_SIGNATURE_EBX: u32 = u32::from_le_bytes(*b"KVMK");
/// CPUID leaf with KVM's paravirtual features (EAX).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// MSR_KVM_SYSTEM_TIME_NEW: where KVM keeps this CPU's pvclock structure up to date.
const MSR_KVM_SYSTEM_TIME: u32 = 0x4b56_4d01;

const PTE_TABLE: u64 = 0x7; // present, writable, user
const PTE_LARGE: u64 = 0x87; // ... and 2 MiB page
const PTE_LARGE_UNCACHED: u64 = PTE_LARGE | 0x18; // ... with PWT and PCD

/// The interrupt descriptor table: 256 16-byte gates, shared by all CPUs.
#[repr(C, align(16))]
struct Idt([AtomicU64; IDT_ENTRIES * 2]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; IDT_ENTRIES * 2]);

/// Device-interrupt vectors (bit n = vector `IRQ_BASE + n`) taken since last asked.
static IRQ_PENDING: AtomicU32 = AtomicU32::new(0);

/// Per device-interrupt vector: how many times [`take_pending_irqs`] found it pending.
static IRQ_SEEN: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];

/// What the CPL0 fault handler records for the CPL3 reporter.
#[repr(C)]
struct FaultRecord {
    vector: AtomicU64,
    error: AtomicU64,
    rip: AtomicU64,
    cs: AtomicU64,
    rsp: AtomicU64,
    cr2: AtomicU64,
}

static FAULT_RECORD: FaultRecord = FaultRecord {
    vector: AtomicU64::new(0),
    error: AtomicU64::new(0),
    rip: AtomicU64::new(0),
    cs: AtomicU64::new(0),
    rsp: AtomicU64::new(0),
    cr2: AtomicU64::new(0),
};
static FAULT_TAKEN: AtomicU32 = AtomicU32::new(0);

global_asm!(
    include_str!("tables.s"),
    pte_table = const PTE_TABLE,
    pte_large = const PTE_LARGE,
    pte_large_uncached = const PTE_LARGE_UNCACHED,
    max_cpus = const MAX_CPUS,
    kstack_size = const KSTACK_SIZE,
    ustack_size = const USTACK_SIZE,
    fault_stack_size = const FAULT_STACK_SIZE,
    tss_size = const TSS_SIZE,
    options(att_syntax)
);

global_asm!(
    include_str!("handlers.s"),
    stub_stride = const STUB_STRIDE,
    error_code_vectors = const ERROR_CODE_VECTORS,
    fault_taken = sym FAULT_TAKEN,
    fault_record = sym FAULT_RECORD,
    fault_main = sym fault_main,
    sel_user_code = const SEL_USER_CODE,
    sel_user_data = const SEL_USER_DATA,
    rflags_user = const RFLAGS_USER,
    irq_base = const IRQ_BASE,
    irq_pending = sym IRQ_PENDING,
    lapic_eoi = const LAPIC_EOI,
    svc_wait = const SVC_WAIT,
    svc_halt = const SVC_HALT,
    svc_triple_fault = const SVC_TRIPLE_FAULT,
    svc_uart_write = const SVC_UART_WRITE,
    svc_kvmclock = const SVC_KVMCLOCK,
    kvm_cpuid_base = const KVM_CPUID_BASE,
    kvm_signature_ebx = const KVM_SIGNATURE_EBX,
    kvm_cpuid_features = const KVM_CPUID_FEATURES,
    kvm_feature_clocksource2 = const KVM_FEATURE_CLOCKSOURCE2,
    msr_kvm_system_time = const MSR_KVM_SYSTEM_TIME,
    idt_entries = const IDT_ENTRIES,
    idt = sym IDT,
    options(att_syntax)
);

/// Values the boot entry assembly (`boot/entry.s`) is assembled with.
pub(crate) mod entry_consts {
    pub const CR0_VALUE: u64 = super::CR0_VALUE;
    pub const CR4_VALUE: u64 = super::CR4_VALUE;
    pub const RFLAGS_USER: u64 = super::RFLAGS_USER;
}

extern "C" {
    fn lks_exception_stubs();
    fn lks_irq_stubs();
    fn lks_service_entry();
    fn lks_spurious_interrupt();
}

/// Writes one interrupt gate. `dpl` 3 lets CPL3 raise the vector itself (only `int3` works that way).
fn set_gate(vector: usize, handler: u64, dpl: u64) {
    let attributes = 0x8e | (dpl << 5); // present 64-bit interrupt gate
    let low = (handler & 0xffff)
        | (u64::from(SEL_CODE64) << 16)
        | (attributes << 40)
        | (((handler >> 16) & 0xffff) << 48);
    IDT.0[vector * 2].store(low, Ordering::Relaxed);
    IDT.0[vector * 2 + 1].store(handler >> 32, Ordering::Relaxed);
}

/// Fills the IDT: exception stubs, the int3 service gate, device-interrupt stubs and the spurious
/// vector. The BSP calls it first thing at CPL3, before anything can fault.
pub fn install_handlers() {
    let exceptions = lks_exception_stubs as *const () as u64;
    for vector in 0..32 {
        set_gate(vector, exceptions + (vector * STUB_STRIDE) as u64, 0);
    }
    set_gate(BREAKPOINT_VECTOR, lks_service_entry as *const () as u64, 3);
    let irqs = lks_irq_stubs as *const () as u64;
    for n in 0..32 {
        set_gate(
            usize::from(IRQ_BASE) + n,
            irqs + (n * STUB_STRIDE) as u64,
            0,
        );
    }
    set_gate(
        usize::from(SPURIOUS_VECTOR),
        lks_spurious_interrupt as *const () as u64,
        0,
    );
}

/// Calls a CPL0 service through the int3 gate.
fn service(number: u32) {
    // SAFETY: the int3 gate (DPL3) runs the service at CPL0 on the TSS stack and IRETQs back; the
    // services touch no memory Rust owns except through interrupts (hence no `nomem`) and clobber
    // only EAX.
    unsafe { asm!("int3", inout("eax") number => _, options(nostack)) };
}

/// Sleeps in CPL0 (`sti; hlt`) until an interrupt arrives; it has been handled on return. Returns at
/// once if a device interrupt was recorded since the last [`take_pending_irqs`], so the pattern
/// "take pending, check for work, wait" never sleeps through an interrupt.
pub fn wait_for_interrupt() {
    service(SVC_WAIT);
}

/// Halts this CPU for ever with interrupts on (so the host does not spin).
pub fn halt_forever() -> ! {
    service(SVC_HALT);
    unreachable!("the halt service never returns");
}

/// Resets the machine by a triple fault.
pub fn triple_fault() -> ! {
    service(SVC_TRIPLE_FAULT);
    unreachable!("a triple fault ends the machine");
}

/// Transmits bytes on the 8250 UART at I/O base `base`, from CPL0: waits for the transmitter to be
/// empty before each 16-byte burst (one FIFO). On a PVM host a port access from CPL0 is several times
/// cheaper than one from CPL3, which must bounce through a #GP and the TSS I/O-bitmap check.
pub fn uart_write(base: u16, bytes: &[u8]) {
    // SAFETY: the service only reads `bytes` (valid for its length) and accesses the UART's ports;
    // it clobbers EAX, RSI, RCX and R8, declared here, and restores DX.
    unsafe {
        asm!(
            "int3",
            inout("eax") SVC_UART_WRITE => _,
            in("dx") base,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            out("r8") _,
            options(nostack, readonly)
        )
    };
}

/// Points this CPU's KVM clock (MSR_KVM_SYSTEM_TIME_NEW) at `value`: a pvclock structure's
/// physical address with bit 0 set to enable it. The CPL0 service first asks the VMM's CPUID for KVM
/// and its KVM_FEATURE_CLOCKSOURCE2; false (nothing written) without them.
pub fn set_kvm_system_time(value: u64) -> bool {
    let done: u32;
    // SAFETY: the service writes one MSR, after which the hypervisor updates the 32-byte structure
    // at `value & !1`; the caller passes memory that it reads only as externally modified. The
    // service clobbers EAX (the result), ECX and EDX, declared here, and restores RBX.
    unsafe {
        asm!(
            "int3",
            inout("eax") SVC_KVMCLOCK => done,
            in("rsi") value,
            out("ecx") _,
            out("edx") _,
            options(nostack)
        )
    };
    done == 1
}

/// Returns and clears the device-interrupt vectors taken so far (bit n = vector `IRQ_BASE + n`),
/// counting each for [`irqs_seen`].
pub fn take_pending_irqs() -> u32 {
    let pending = IRQ_PENDING.swap(0, Ordering::AcqRel);
    for (bit, seen) in IRQ_SEEN.iter().enumerate() {
        if pending & (1 << bit) != 0 {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    }
    pending
}

/// Whether `vector` was taken since the pending mask was last taken (the mask is left alone).
pub fn irq_pending(vector: u8) -> bool {
    let bit = u32::from(vector.wrapping_sub(IRQ_BASE));
    bit < 32 && IRQ_PENDING.load(Ordering::Acquire) & (1 << bit) != 0
}

/// How many times `vector` was found pending (several interrupts between two looks count once).
pub fn irqs_seen(vector: u8) -> u32 {
    IRQ_SEEN
        .get(usize::from(vector.wrapping_sub(IRQ_BASE)))
        .map_or(0, |seen| seen.load(Ordering::Relaxed))
}

/// Reads the time-stamp counter (allowed at CPL3).
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter into EDX:EAX.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// The CPL3 side of a fault: the CPL0 handler recorded it and IRETQed here on the fault stack.
extern "C" fn fault_main() -> ! {
    let record = &FAULT_RECORD;
    let vector = record.vector.load(Ordering::Relaxed);
    // CR2 means something only for a page fault.
    let addr = if vector == PAGE_FAULT_VECTOR {
        record.cr2.load(Ordering::Relaxed)
    } else {
        0
    };
    crate::report::fault_line(format_args!(
        "fault vector={} rip={:#x} addr={:#x} error={:#x} cpl={} rsp={:#x}",
        vector,
        record.rip.load(Ordering::Relaxed),
        addr,
        record.error.load(Ordering::Relaxed),
        record.cs.load(Ordering::Relaxed) & 3,
        record.rsp.load(Ordering::Relaxed),
    ));
    crate::reset::reset()
}
