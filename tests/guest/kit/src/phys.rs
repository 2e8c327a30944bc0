//! Access to guest-physical memory and MMIO. The kit identity-maps all of it (0..4 GiB and RAM above)
//! for CPL3, so a physical address is a pointer. An address outside the map faults, which the fault
//! reporter shows as `LKS fault vector=14`.

use core::ptr;

/// Reads a byte at a physical address.
pub fn read_u8(addr: u64) -> u8 {
    // SAFETY: identity-mapped memory that no Rust object owns (firmware tables, boot data, MMIO);
    // a volatile read has no effect on Rust's view of memory.
    unsafe { ptr::read_volatile(addr as *const u8) }
}

/// Reads a little-endian u16 at a physical address (any alignment).
pub fn read_u16(addr: u64) -> u16 {
    u16::from_le_bytes([read_u8(addr), read_u8(addr + 1)])
}

/// Reads a little-endian u32 at a physical address (any alignment).
pub fn read_u32(addr: u64) -> u32 {
    u32::from(read_u16(addr)) | (u32::from(read_u16(addr + 2)) << 16)
}

/// Reads a little-endian u64 at a physical address (any alignment).
pub fn read_u64(addr: u64) -> u64 {
    u64::from(read_u32(addr)) | (u64::from(read_u32(addr + 4)) << 32)
}

/// Reads a 32-bit MMIO register (naturally aligned, one access).
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: a single aligned volatile load from an identity-mapped device register.
    unsafe { ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register (naturally aligned, one access).
pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: a single aligned volatile store to an identity-mapped device register, which no Rust
    // object owns.
    unsafe { ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads a naturally aligned value with one volatile access: for memory shared with a device (virtio
/// rings, request headers) and for device registers.
pub fn load<T: Copy>(addr: u64) -> T {
    // SAFETY: identity-mapped memory that no Rust reference covers (DMA areas from
    // `crate::frames`, device registers); callers keep `addr` aligned for `T`.
    unsafe { ptr::read_volatile(addr as *const T) }
}

/// Writes a naturally aligned value with one volatile access (see [`load`]).
pub fn store<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for `load`: memory shared with a device or a device register, aligned for `T`.
    unsafe { ptr::write_volatile(addr as *mut T, value) }
}

/// Copies bytes into physical memory that no Rust object owns (e.g. the AP trampoline page).
pub fn write_bytes(addr: u64, bytes: &[u8]) {
    for (offset, byte) in bytes.iter().enumerate() {
        // SAFETY: callers pass RAM that the memory map lists as usable and that the kit does not use.
        unsafe { ptr::write_volatile((addr + offset as u64) as *mut u8, *byte) };
    }
}

/// Borrows physical memory that nobody writes for the rest of the run (e.g. the initrd) as a slice.
///
/// # Safety
/// `addr..addr + len` must be identity-mapped and must not be written while the slice lives.
pub unsafe fn slice(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}
