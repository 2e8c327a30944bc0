//! The memory functions compiled Rust calls (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`), which
//! a freestanding program must provide itself. They run at CPL3 like all Rust code.

use core::arch::asm;

/// Copies `n` bytes between non-overlapping buffers.
///
/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; DF is clear (the ABI requires it).
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags))
    };
    dest
}

/// Copies `n` bytes between buffers that may overlap.
///
/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: copying forwards is safe when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards from the last byte, with DF set only for the duration of the copy.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            inout("rcx") n => _,
            options(nostack)
        )
    };
    dest
}

/// Fills `n` bytes with the low byte of `value`.
///
/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") value as u8, options(nostack, preserves_flags))
    };
    dest
}

/// Compares `n` bytes; returns the difference of the first unequal pair, or 0.
///
/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges hold `n` readable bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Compares `n` bytes for equality only (0 when equal).
///
/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
