//! Device counters as the control plane reads them: name and value pairs.

/// A set of counters that can be read while the device runs.
pub trait Counters: Send + Sync {
    /// Every counter's name and current value.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// Implements [`Counters`] for a struct of `AtomicU64` fields, naming each counter after its
/// field.
#[macro_export]
macro_rules! impl_counters {
    ($type:ty { $($field:ident),+ $(,)? }) => {
        impl $crate::metrics::Counters for $type {
            fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(std::sync::atomic::Ordering::Relaxed))),+]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::Counters;

    #[derive(Default)]
    struct Two {
        a: AtomicU64,
        b: AtomicU64,
    }
    impl_counters!(Two { a, b });

    #[test]
    fn names_follow_fields() {
        let t = Two::default();
        t.b.store(7, Ordering::Relaxed);
        assert_eq!(t.counters(), vec![("a", 0), ("b", 7)]);
    }
}
