//! Seeded, replayable randomness for failure trials: a seed from an environment variable (or the
//! clock), printed so that a failing run can be replayed, and the number of trials from another.

/// xorshift64 from a seed taken from the environment variable `seed_var`, or the clock; the
/// seed is printed with `test`'s name.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed_var` (a u64), or from the clock when it is not set.
    pub fn new(test: &str, seed_var: &str) -> Rng {
        let seed = std::env::var(seed_var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("{test}: {seed_var}={seed}");
        Rng(seed)
    }

    /// The next number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// How many trials to run: the environment variable `var` (a bench script asks for 100), else
/// `default`.
pub fn count(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_numbers() {
        let (mut a, mut b) = (Rng(42 | 1), Rng(42 | 1));
        let first: Vec<u64> = (0..5).map(|_| a.below(1000)).collect();
        let second: Vec<u64> = (0..5).map(|_| b.below(1000)).collect();
        assert_eq!(first, second);
        assert!(first.iter().all(|&x| x < 1000));
        assert!(first.windows(2).any(|w| w[0] != w[1]));
    }
}
