//! Giving freed heap memory back to the system. An argon2 check allocates 19 MiB and a large
//! response some hundreds of KiB; glibc keeps such freed blocks in its per-thread arenas
//! (after the first free it stops using mmap for blocks that size), so an endpoint that has
//! answered a burst would stay at tens of MiB while idle. Trimming after argon2 checks and once
//! a burst of requests has ended keeps the idle footprint small.

use std::sync::atomic::{AtomicU64, Ordering};

/// Requests answered since the last trim.
static SINCE_TRIM: AtomicU64 = AtomicU64::new(0);

/// Counts a request.
pub fn note_request() {
    SINCE_TRIM.fetch_add(1, Ordering::Relaxed);
}

/// Returns free heap pages of every arena to the system.
pub fn trim() {
    SINCE_TRIM.store(0, Ordering::Relaxed);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own allocator state, under its locks; it takes
    // no pointers from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The count seen by the previous `trim_if_quiet`.
static LAST_SEEN: AtomicU64 = AtomicU64::new(0);

/// Called periodically: trims once requests were answered since the last trim and none
/// arrived since the previous call (a burst has ended).
pub fn trim_if_quiet() {
    let now = SINCE_TRIM.load(Ordering::Relaxed);
    let before = LAST_SEEN.swap(now, Ordering::Relaxed);
    if now > 0 && now == before {
        trim();
        LAST_SEEN.store(0, Ordering::Relaxed);
    }
}
