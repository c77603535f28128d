//! Which generator should expand SecAgg+ mask seeds? A client expands k + 1 = 11 seeds into
//! 1,663,370 words each (the CNN, 6.65 MB per stream) and adds them to its input; the server
//! expands one per survivor (self masks) and k per dropped client. This prints the expansion
//! rate of each candidate on this machine, in the same 16 KiB blocks the mask code uses, and
//! its ratio to the generator in use (ChaCha20 through `rand_chacha`).
//!
//!     cargo bench -p flotilla-crypto --bench mask_prg
//!
//! Every candidate is a PRG from a 256-bit (AES-128: 128-bit) key under the usual assumption on
//! its cipher; ChaCha8 and ChaCha12 are the reduced-round variants ("Too Much Crypto",
//! Aumasson 2019, argues 8 rounds keep a wide margin).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::time::Instant;

use aes::cipher::{KeyIvInit, StreamCipher as _};
use rand_chacha::rand_core::{RngCore, SeedableRng};

const N: usize = 1_663_370;
const STREAMS: usize = 11;
const BLOCK: usize = 4096;

type Aes128Ctr = ctr::Ctr128LE<aes::Aes128>;
type Aes256Ctr = ctr::Ctr128LE<aes::Aes256>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn add(chunk: &mut [u32], words: &[u32]) {
    for (x, m) in chunk.iter_mut().zip(words) {
        *x = x.wrapping_add(u32::from_le(*m));
    }
}

/// Masks `v` with `STREAMS` streams from `fill` (which writes the next keystream bytes of a
/// generator made by `make` from the seed).
fn run<G>(v: &mut [u32], make: impl Fn(&[u8; 32]) -> G, fill: impl Fn(&mut G, &mut [u8])) {
    let mut buf = [0u32; BLOCK];
    for s in 0..STREAMS {
        let mut g = make(&[s as u8 + 1; 32]);
        for chunk in v.chunks_mut(BLOCK) {
            let words = &mut buf[..chunk.len()];
            fill(&mut g, bytemuck::cast_slice_mut(words));
            add(chunk, words);
        }
    }
}

fn time(name: &str, reference: Option<f64>, mut f: impl FnMut(&mut [u32])) -> f64 {
    let mut v = vec![0u32; N];
    let mut times = Vec::new();
    for i in 0..8 {
        let t = Instant::now();
        f(&mut v);
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&v);
    let m = median(times);
    let rate = (N * 4 * STREAMS) as f64 / m / 1e9;
    match reference {
        Some(r) => println!(
            "{name:<28} {:>6.1} ms  {rate:>5.2} GB/s  {:>5.2}x",
            m * 1e3,
            r / m
        ),
        None => println!(
            "{name:<28} {:>6.1} ms  {rate:>5.2} GB/s  (reference)",
            m * 1e3
        ),
    }
    m
}

fn main() {
    println!(
        "{STREAMS} mask streams of {N} words ({:.2} MB each), median of 7; speed-up against the reference",
        (N * 4) as f64 / 1e6
    );
    let r = time("ChaCha20 (rand_chacha)", None, |v| {
        run(
            v,
            |s| rand_chacha::ChaCha20Rng::from_seed(*s),
            |g, b| g.fill_bytes(b),
        )
    });
    time("ChaCha12 (rand_chacha)", Some(r), |v| {
        run(
            v,
            |s| rand_chacha::ChaCha12Rng::from_seed(*s),
            |g, b| g.fill_bytes(b),
        )
    });
    time("ChaCha8 (rand_chacha)", Some(r), |v| {
        run(
            v,
            |s| rand_chacha::ChaCha8Rng::from_seed(*s),
            |g, b| g.fill_bytes(b),
        )
    });
    time("ChaCha20 (chacha20 crate)", Some(r), |v| {
        use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
        run(
            v,
            |s| chacha20::ChaCha20::new(s.into(), &[0u8; 12].into()),
            |g, b| {
                b.fill(0);
                g.apply_keystream(b);
            },
        )
    });
    time("AES-128-CTR (aes + ctr)", Some(r), |v| {
        run(
            v,
            |s| Aes128Ctr::new(s[..16].into(), &[0u8; 16].into()),
            |g, b| {
                b.fill(0);
                g.apply_keystream(b);
            },
        )
    });
    time("AES-256-CTR (aes + ctr)", Some(r), |v| {
        run(
            v,
            |s| Aes256Ctr::new(s.into(), &[0u8; 16].into()),
            |g, b| {
                b.fill(0);
                g.apply_keystream(b);
            },
        )
    });
}
