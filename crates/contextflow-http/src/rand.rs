//! Fast random ids for spans, traces and request ids.
//!
//! A span id is made for every request and every outgoing call, so a system call per id would
//! cost more than the rest of the middleware. Each thread runs a SplitMix64 generator seeded
//! once from the operating system's random source (through `uuid`'s `getrandom`).

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// 64 bits from the operating system's random source.
fn seed() -> u64 {
    let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
    a ^ b.rotate_left(29)
}

/// The next 64 random bits of this thread's generator.
pub(crate) fn next_u64() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// 64 random bits that are not all zero.
pub(crate) fn non_zero_u64() -> u64 {
    loop {
        let n = next_u64();
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ() {
        let a = next_u64();
        let b = next_u64();
        assert_ne!(a, b);
        assert_ne!(non_zero_u64(), 0);
    }
}
