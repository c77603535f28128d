//! Shamir secret sharing of 32-byte secrets over GF(p), p = 2^61 − 1.
//!
//! A secret is cut into five limbs of at most 56 bits (7 + 7 + 7 + 7 + 4 bytes), each shared
//! with its own random polynomial of degree `t − 1`; a share is the evaluation point `x`
//! (1..=n) and the five values. Any `t` shares recover the secret by Lagrange interpolation at
//! zero; fewer reveal nothing about it.

use super::Entropy;

use crate::Error;

/// The field's prime, 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;
const LIMBS: usize = 5;

/// One share of a 32-byte secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// Evaluation point (1-based; never 0).
    pub x: u32,
    /// Polynomial values, one per limb.
    pub y: [u64; LIMBS],
}

fn reduce(v: u128) -> u64 {
    // v < 2^122: fold the high bits twice.
    let folded = (v & P as u128) + (v >> 61);
    let folded = (folded & P as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= P { r - P } else { r }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(a as u128 * b as u128)
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (i, chunk) in secret.chunks(7).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        if let Some(o) = out.get_mut(i) {
            *o = u64::from_le_bytes(b);
        }
    }
    out
}

fn unlimbs(l: &[u64; LIMBS]) -> Result<[u8; 32], Error> {
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(7).enumerate() {
        let v = l.get(i).copied().unwrap_or(0);
        if v >> (8 * chunk.len()) != 0 {
            return Err(Error::SecAgg(
                "shares are inconsistent (reconstructed limb out of range)".into(),
            ));
        }
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    Ok(out)
}

fn random_element(rng: &mut dyn Entropy) -> Result<u64, Error> {
    loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b)?;
        let v = u64::from_le_bytes(b) & P; // 61 bits
        if v < P {
            return Ok(v);
        }
    }
}

/// Splits `secret` into `n` shares (points 1..=n), any `t` of which recover it.
pub fn split(
    secret: &[u8; 32],
    t: usize,
    n: usize,
    rng: &mut dyn Entropy,
) -> Result<Vec<Share>, Error> {
    if n > u32::MAX as usize {
        return Err(Error::SecAgg(format!("invalid threshold {t} of {n}")));
    }
    let points: Vec<u32> = (1..=n as u32).collect();
    split_at(secret, t, &points, rng)
}

/// Splits `secret` into one share per evaluation point in `points` (distinct, non-zero), any
/// `t` of which recover it. SecAgg uses a neighbour's position in the round as its point.
pub fn split_at(
    secret: &[u8; 32],
    t: usize,
    points: &[u32],
    rng: &mut dyn Entropy,
) -> Result<Vec<Share>, Error> {
    let n = points.len();
    if t == 0 || t > n {
        return Err(Error::SecAgg(format!("invalid threshold {t} of {n}")));
    }
    let mut seen = std::collections::BTreeSet::new();
    if points.iter().any(|&x| x == 0 || !seen.insert(x)) {
        return Err(Error::SecAgg(
            "share points must be distinct and non-zero".into(),
        ));
    }
    let constants = limbs(secret);
    // coefficients[limb][degree]
    let mut coeffs = Vec::with_capacity(LIMBS);
    for c in constants {
        let mut poly = vec![c];
        for _ in 1..t {
            poly.push(random_element(rng)?);
        }
        coeffs.push(poly);
    }
    Ok(points
        .iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (yi, poly) in y.iter_mut().zip(&coeffs) {
                // Horner.
                *yi = poly
                    .iter()
                    .rev()
                    .fold(0, |acc, &c| add(mul(acc, x as u64), c));
            }
            Share { x, y }
        })
        .collect())
}

/// Recovers the secret from at least `t` shares (the first `t` with distinct points are used).
pub fn recover(shares: &[Share], t: usize) -> Result<[u8; 32], Error> {
    let mut chosen: Vec<&Share> = Vec::with_capacity(t);
    for s in shares {
        if s.x == 0 || s.y.iter().any(|&v| v >= P) {
            return Err(Error::SecAgg("malformed share".into()));
        }
        if !chosen.iter().any(|c| c.x == s.x) {
            chosen.push(s);
        }
        if chosen.len() == t {
            break;
        }
    }
    if t == 0 || chosen.len() < t {
        return Err(Error::SecAgg(format!(
            "{} distinct shares, {t} needed to recover",
            chosen.len()
        )));
    }
    let mut secret = [0u64; LIMBS];
    for (j, sj) in chosen.iter().enumerate() {
        // Lagrange basis at 0: Π_{m≠j} x_m / (x_m − x_j).
        let xj = sj.x as u64;
        let (mut num, mut den) = (1u64, 1u64);
        for (m, sm) in chosen.iter().enumerate() {
            if m != j {
                let xm = sm.x as u64;
                num = mul(num, xm);
                den = mul(den, sub(xm, xj));
            }
        }
        let l = mul(num, inv(den));
        for (acc, &y) in secret.iter_mut().zip(&sj.y) {
            *acc = add(*acc, mul(y, l));
        }
    }
    unlimbs(&secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::SystemEntropy;
    use proptest::prelude::*;

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1); // (−1)² = 1
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1, 2, 12345, P - 2] {
            assert_eq!(mul(a, inv(a)), 1);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_t_shares_recover(secret in any::<[u8; 32]>(), n in 1usize..40, t_frac in 0.0f64..1.0, pick in any::<u64>()) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let shares = split(&secret, t, n, &mut SystemEntropy::new()).unwrap();
            // A pseudo-random subset of exactly t shares.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut s = pick;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                idx.swap(i, (s >> 33) as usize % (i + 1));
            }
            let subset: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(recover(&subset, t).unwrap(), secret);
        }

        #[test]
        fn fewer_than_t_shares_fail_or_differ(secret in any::<[u8; 32]>(), n in 3usize..20) {
            let t = n / 2 + 1;
            let shares = split(&secret, t, n, &mut SystemEntropy::new()).unwrap();
            prop_assert!(recover(&shares[..t - 1], t).is_err());
            // Interpolating t−1 shares as if they were enough does not give the secret.
            let wrong = recover(&shares[..t - 1], t - 1);
            prop_assert!(wrong.map(|w| w != secret).unwrap_or(true));
        }
    }

    #[test]
    fn bad_parameters_and_shares_are_errors() {
        let mut rng = SystemEntropy::new();
        assert!(split(&[0; 32], 0, 3, &mut rng).is_err());
        assert!(split(&[0; 32], 4, 3, &mut rng).is_err());
        let mut s = split(&[7; 32], 2, 3, &mut rng).unwrap();
        s[0].y[0] = P; // out of the field
        assert!(recover(&s, 2).is_err());
        s[0].x = 0;
        assert!(recover(&s, 2).is_err());
    }
}
