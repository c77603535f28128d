//! The mask generator: AES-256 in counter mode (NIST SP 800-38A, a 128-bit big-endian counter
//! starting at zero) keyed by a 32-byte seed, its keystream read as little-endian `u32` words
//! and added to or subtracted from a vector modulo 2^32. This is the PRG of Bonawitz et al.'s
//! implementation (AES-CTR); under the usual assumption that AES-256 is a pseudorandom
//! permutation, the keystream of a uniform seed is indistinguishable from uniform words, which
//! is all the protocol's security argument asks of it. It replaced ChaCha20 because it is
//! about twice as fast where AES is in hardware (x86 AES-NI, ARMv8 crypto extensions; both
//! detected at run time): `cargo bench -p flotilla-crypto --bench mask_prg` compares them.
//!
//! Masks are generated in blocks of 16 KiB and applied in place, so masking a 1.66 M-parameter
//! vector allocates nothing beyond one block. Word `i` of a stream is bytes `4i..4i + 4` of
//! the keystream, so any range can be generated on its own (the counter starts at the block
//! holding word `i`): [`apply_all`] splits a vector across threads that way.

use aes::cipher::{KeyIvInit, StreamCipher};

type Prg = ctr::Ctr128BE<aes::Aes256>;

/// The generator of `seed`, positioned at word `offset` of its stream.
fn prg_at(seed: &[u8; 32], offset: usize) -> Prg {
    let block = (offset / 4) as u128;
    let mut prg = Prg::new(seed.into(), &block.to_be_bytes().into());
    let skip = (offset % 4) * 4;
    if skip > 0 {
        let mut discard = [0u8; 16];
        if let Some(d) = discard.get_mut(..skip) {
            prg.apply_keystream(d);
        }
    }
    prg
}

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// `v += mask`.
    Add,
    /// `v -= mask`.
    Sub,
}

const BLOCK: usize = 4096;

/// Applies `PRG(seed)` to `v` with wrapping arithmetic.
pub fn apply(seed: &[u8; 32], v: &mut [u32], sign: Sign) {
    apply_at(seed, v, 0, sign);
}

/// Applies words `offset..offset + v.len()` of `PRG(seed)` to `v` (the keystream is seeked,
/// not generated from the start).
pub fn apply_at(seed: &[u8; 32], v: &mut [u32], offset: usize, sign: Sign) {
    let mut prg = prg_at(seed, offset);
    let mut buf = [0u32; BLOCK];
    for chunk in v.chunks_mut(BLOCK) {
        let words = &mut buf[..chunk.len()];
        words.fill(0);
        prg.apply_keystream(bytemuck::cast_slice_mut(words));
        match sign {
            Sign::Add => {
                for (x, m) in chunk.iter_mut().zip(words.iter()) {
                    *x = x.wrapping_add(u32::from_le(*m));
                }
            }
            Sign::Sub => {
                for (x, m) in chunk.iter_mut().zip(words.iter()) {
                    *x = x.wrapping_sub(u32::from_le(*m));
                }
            }
        }
    }
}

/// Applies every mask in `masks` to `v` on up to `threads` threads. The vector is cut into
/// one range per thread; each thread walks its range in cache-sized blocks and applies all
/// masks to a block before moving on. Same result as applying them one by one.
pub fn apply_all(masks: &[([u8; 32], Sign)], v: &mut [u32], threads: usize) {
    const CACHE_BLOCK: usize = 16 * 1024;
    let threads = threads.clamp(1, 64);
    let per = v.len().div_ceil(threads).max(CACHE_BLOCK);
    std::thread::scope(|scope| {
        for (t, range) in v.chunks_mut(per).enumerate() {
            scope.spawn(move || {
                let base = t * per;
                for (b, block) in range.chunks_mut(CACHE_BLOCK).enumerate() {
                    for (seed, sign) in masks {
                        apply_at(seed, block, base + b * CACHE_BLOCK, *sign);
                    }
                }
            });
        }
    });
}

/// The first `n` words of `PRG(seed)`.
pub fn expand(seed: &[u8; 32], n: usize) -> Vec<u32> {
    let mut v = vec![0u32; n];
    apply(seed, &mut v, Sign::Add);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Known answer: the first words of the stream of seed `[1; 32]` are AES-256-CTR's keystream
    /// under that key from a zero counter (computed with Python's `cryptography`, OpenSSL),
    /// read little-endian. A change of generator would change every mask: peers of two versions
    /// would compute garbage sums, so it must come with a protocol version.
    #[test]
    fn the_stream_is_aes_256_ctr() {
        let expected = [
            0xa5ca9872, 0xad1e0365, 0xd223cec6, 0x7863a63e, 0x89aea8ae, 0xcd39b644, 0xc4de2a08,
            0x0722d3fe,
        ];
        assert_eq!(expand(&[1; 32], 8), expected);
        // Starting mid-block (word 5) gives the same words.
        let mut v = vec![0u32; 3];
        apply_at(&[1; 32], &mut v, 5, Sign::Add);
        assert_eq!(v, expected[5..]);
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        assert_eq!(expand(&[1; 32], 10_000), expand(&[1; 32], 10_000));
        assert_ne!(expand(&[1; 32], 16), expand(&[2; 32], 16));
        // A prefix is the same whatever the length (blocks are consumed in order).
        assert_eq!(expand(&[3; 32], 5000)[..100], expand(&[3; 32], 100)[..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Pairwise masks cancel in the sum: u adds s_uv's mask, v subtracts it.
        #[test]
        fn pairwise_masks_cancel(inputs in proptest::collection::vec(proptest::collection::vec(any::<u32>(), 257), 2..6), seed in any::<[u8; 32]>()) {
            let n = inputs.len();
            let mut masked = inputs.clone();
            for u in 0..n {
                for v in 0..n {
                    if u == v { continue; }
                    let mut s = seed;
                    s[0] = u.min(v) as u8;
                    s[1] = u.max(v) as u8;
                    apply(&s, &mut masked[u], if u < v { Sign::Add } else { Sign::Sub });
                }
            }
            let sum = |vs: &[Vec<u32>]| (0..257).map(|i| vs.iter().fold(0u32, |a, v| a.wrapping_add(v[i]))).collect::<Vec<_>>();
            prop_assert_eq!(sum(&masked), sum(&inputs));
            prop_assert_ne!(&masked[0], &inputs[0]);
        }
    }

    #[test]
    fn seeking_and_threads_give_the_same_masks() {
        let v: Vec<u32> = (0..100_003).collect();
        let masks: Vec<([u8; 32], Sign)> = (0..7u8)
            .map(|i| ([i; 32], if i % 2 == 0 { Sign::Add } else { Sign::Sub }))
            .collect();
        let mut one = v.clone();
        for (s, sign) in &masks {
            apply(s, &mut one, *sign);
        }
        for threads in [1, 2, 3, 8] {
            let mut many = v.clone();
            apply_all(&masks, &mut many, threads);
            assert_eq!(many, one, "{threads} threads");
        }
        let mut tail = v[5000..].to_vec();
        apply_at(&[1; 32], &mut tail, 5000, Sign::Sub);
        let mut whole = v.clone();
        apply(&[1; 32], &mut whole, Sign::Sub);
        assert_eq!(tail, whole[5000..]);
    }

    /// The bytes of one masked vector are uniform: a chi-square test over 256 byte values
    /// (255 degrees of freedom; 350 is beyond the 99.9th percentile, about 330).
    #[test]
    fn masked_vector_bytes_are_uniform() {
        let mut v: Vec<u32> = (0..250_000).map(|i| (i % 7) as u32).collect(); // very non-uniform input
        apply(&[9; 32], &mut v, Sign::Add);
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        let mut counts = [0f64; 256];
        for &b in bytes {
            counts[b as usize] += 1.0;
        }
        let expected = bytes.len() as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 350.0, "chi-square {chi2}");
    }
}
