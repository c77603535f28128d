//! Client-side cost of masking one update for SecAgg+: quantize 1,663,370 values (the CNN),
//! then add the self mask and k = 10 pairwise masks (AES-256-CTR), in place.
//!
//!     cargo bench -p flotilla-crypto --bench masking
//!
//! Prints the median of 11 runs, and the mask expansion rate it implies.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::time::Instant;

use flotilla_crypto::secagg::mask::{Sign, apply_all};
use flotilla_crypto::secagg::quantize::Quantizer;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const N: usize = 1_663_370;
const K: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let update: Vec<f32> = (0..N).map(|i| ((i % 1000) as f32 - 500.0) * 1e-4).collect();
    let q = Quantizer::new(1.0, 16).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (mut quant, mut mask, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..12 {
        let t0 = Instant::now();
        let mut v = q.quantize(&update, &mut rng);
        let t1 = Instant::now();
        // The self mask b_u and K pairwise masks, in one pass as the client applies them.
        let mut masks = vec![([run as u8; 32], Sign::Add)];
        for j in 0..K {
            let mut seed = [0u8; 32];
            seed[0] = j as u8;
            masks.push((seed, if j % 2 == 0 { Sign::Add } else { Sign::Sub }));
        }
        apply_all(&masks, &mut v, 1);
        let t2 = Instant::now();
        std::hint::black_box(&v);
        if run > 0 {
            quant.push((t1 - t0).as_secs_f64() * 1e3);
            mask.push((t2 - t1).as_secs_f64() * 1e3);
            total.push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    let m = median(mask.clone());
    println!(
        "masking {N} params, k = {K}: quantize {:.1} ms, {} masks {:.1} ms, total {:.1} ms (median of {}); AES-256-CTR {:.2} GB/s",
        median(quant),
        K + 1,
        m,
        median(total),
        mask.len(),
        (N * 4 * (K + 1)) as f64 / (m / 1e3) / 1e9
    );
}
