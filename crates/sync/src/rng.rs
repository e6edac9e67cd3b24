//! A tiny deterministic random source.
//!
//! This module exists because the engines need ids and jitter but must not read a thread RNG:
//! every random choice comes from a seed in the config, so a run replays exactly.

/// SplitMix64: small, fast, and good enough for ids and jitter (not for secrets).
#[derive(Clone, Debug)]
pub(crate) struct SplitMix {
    /// The generator state.
    state: u64,
}

impl SplitMix {
    pub(crate) fn new(seed: u64) -> SplitMix {
        SplitMix { state: seed }
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
