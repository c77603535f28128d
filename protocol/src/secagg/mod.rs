//! SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) as two sans-IO pieces: the
//! server's [`ServerRound`], driven by the [`crate::Coordinator`], and the client's
//! [`ClientRound`], driven by the [`crate::Participant`]. The specification is
//! `SECURE_AGGREGATION.md`; the math lives in `flotilla_crypto::secagg`.
//!
//! One secure round, after the server sends `Train` with a [`SecAggSetup`]:
//!
//! 0. **AdvertiseKeys.** Each client makes X25519 key pairs `c` (share encryption) and `s`
//!    (pairwise masks) and signs both public keys, the round, its id and the hash of the model
//!    it received with its certificate key. The server forwards each client its neighbours'
//!    advertisements (with their certificates). A client checks every certificate against the
//!    federation CA and every signature against *its own* model hash: a forged advertisement
//!    or a model that differs between neighbours aborts the round.
//! 1. **ShareKeys.** The client Shamir-shares `s`'s secret and a fresh self-mask seed `b`
//!    (threshold `t`, one share per neighbour at the neighbour's position + 1) and seals each
//!    neighbour's pair of shares with ChaCha20-Poly1305 under HKDF(X25519(c_u, c_v)); the server
//!    only relays ciphertexts.
//! 2. **MaskedInput.** After training, the client encodes `w/W · (update − global)` (clipped,
//!    stochastically rounded to `b` bits) followed by its weight `w` (its example count, capped
//!    at `W = max_weight`), adds `PRG(b)` and `±PRG(s_uv)` for every neighbour that shared keys,
//!    and uploads the `u32` words (4 bytes per parameter).
//! 3. **Unmasking.** The server sends the survivor list; each survivor checks it and signs
//!    it; the server relays the neighbours' signatures with the unmask request, and a client
//!    reveals shares only if at least `t` neighbours signed the same list. It reveals the share
//!    of `b_v` for a survivor `v` or of `s_v` for a dropped `v` — never both: a request naming a
//!    client in both lists, or a second request, is refused. The server reconstructs, removes
//!    the masks and learns `Σ w·update` and `Σ w` — the only thing it ever sees.
//!
//! If dropouts leave a client whose masks must be removed with fewer than `t` live
//! neighbours, the round is aborted before anything is revealed.

use flotilla_crypto::secagg::keys::{self};
use flotilla_crypto::secagg::mask::Sign;
use flotilla_crypto::secagg::quantize::Quantizer;
use flotilla_crypto::secagg::shamir::Share;
use flotilla_crypto::secagg::sign::{PeerVerifier, Signer};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::strategy::WeightedSum;
use crate::wire::config::SecAggSetup;
use crate::wire::messages::{ClientId, TrainRes};
use crate::wire::params::Params;
use crate::{Error, SecAggError};

const MASK_PURPOSE: &[u8] = b"flotilla secagg pairwise mask v1";
const SHARE_PURPOSE: &[u8] = b"flotilla secagg share encryption v1";
/// Bytes of one serialized share: the point (4) and five limbs (8 each).
const SHARE_BYTES: usize = 4 + 5 * 8;
/// Bytes of a sealed pair of shares: two shares and the Poly1305 tag.
pub const SEALED_SHARE_BYTES: usize = 2 * SHARE_BYTES + 16;
const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;
const MAX_SIGNATURE_BYTES: usize = 128;

/// Secure-aggregation settings of a federation (the server's `[secure_aggregation]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggConfig {
    /// Neighbours per client, `k` (SecAgg+). 0, or at least the number of sampled clients
    /// minus one, gives classic SecAgg (everyone masks with everyone). Odd values are rounded
    /// up to even (the ring graph needs it).
    pub neighbours: usize,
    /// Shamir threshold `t`: shares needed to recover a client's secrets, and the number of
    /// a client's neighbours that must collude to learn its update. Kept in
    /// `(k/2, k]` for the round's effective `k`.
    pub threshold: usize,
    /// Clipping range `c` of the weighted update `w/W · (local − global)`, per coordinate.
    pub clip: f32,
    /// Quantization bits `b`; lowered for a round if `n · (2^b − 1)` would wrap 32 bits.
    pub bits: u32,
    /// `W`: a client's weight (its example count) is capped at this, and the update it masks
    /// is scaled by `w / W`, so that `c` bounds every client alike.
    pub max_weight: u64,
    /// How long each key-exchange and unmasking step waits for stragglers, in milliseconds.
    /// (Masked-input collection waits until the round deadline.)
    pub phase_timeout_ms: u64,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            neighbours: 10,
            threshold: 6,
            clip: 1.0,
            bits: 24,
            max_weight: 10_000,
            phase_timeout_ms: 30_000,
        }
    }
}

impl SecAggConfig {
    /// Checks the settings that do not depend on the round.
    pub fn validate(&self) -> Result<(), Error> {
        Quantizer::new(self.clip, self.bits).map_err(|e| Error::Config(e.to_string()))?;
        if self.max_weight == 0 || self.max_weight > u32::MAX as u64 / 2 {
            return Err(Error::Config(format!(
                "secure_aggregation.max_weight must be in 1..={}, not {}",
                u32::MAX / 2,
                self.max_weight
            )));
        }
        if self.threshold == 0 {
            return Err(Error::Config(
                "secure_aggregation.threshold must be at least 1".into(),
            ));
        }
        if self.phase_timeout_ms == 0 {
            return Err(Error::Config(
                "secure_aggregation.phase_timeout_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The parameters of a round over `participants` (any order; they are sorted).
    pub fn setup_for(
        &self,
        mut participants: Vec<ClientId>,
        graph_seed: u64,
    ) -> Result<SecAggSetup, Error> {
        self.validate()?;
        participants.sort();
        participants.dedup();
        let n = participants.len();
        if n < 2 {
            return Err(SecAggError::InvalidParameters(format!(
                "secure aggregation needs at least 2 clients, {n} sampled"
            ))
            .into());
        }
        let all = n - 1;
        let k = if self.neighbours == 0 || self.neighbours >= all {
            all
        } else if self.neighbours % 2 == 1 {
            (self.neighbours + 1).min(all)
        } else {
            self.neighbours
        };
        let t = self.threshold.clamp(k / 2 + 1, k);
        let mut bits = self.bits.min(31);
        while bits > 1 && Quantizer::new(self.clip, bits)?.max_summands() < n as u64 {
            bits -= 1;
        }
        if (n as u64).saturating_mul(self.max_weight) > u32::MAX as u64 {
            return Err(SecAggError::InvalidParameters(format!(
                "{n} clients × max_weight {} overflows 32 bits",
                self.max_weight
            ))
            .into());
        }
        let setup = SecAggSetup {
            participants,
            neighbours: k as u32,
            threshold: t as u32,
            clip: self.clip,
            bits,
            max_weight: self.max_weight,
            graph_seed,
        };
        setup.validate()?;
        Ok(setup)
    }
}

/// A client's secure-aggregation credentials: its certificate and key (to sign) and the
/// federation CA (to check its neighbours).
#[derive(Debug)]
pub struct SecAggIdentity {
    /// Signs with the certificate's key.
    pub signer: Signer,
    /// The client's own certificate (DER), sent with its advertisements.
    pub certificate: Vec<u8>,
    /// Checks neighbours' certificates.
    pub verifier: PeerVerifier,
}

/// What a client's masked input hides: `quantize(min(w, W)/W · (local − global))` followed by
/// `min(w, W)`. Public so that tests can compute the plaintext sum the server must find.
pub fn encode_input(
    setup: &SecAggSetup,
    global: &Params,
    result: &TrainRes,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<u32>, Error> {
    result.params.check_same_manifest(global.manifest())?;
    let w = result.num_examples.min(setup.max_weight);
    if w == 0 {
        return Err(
            SecAggError::InvalidInput("a secure update needs a positive weight".into()).into(),
        );
    }
    let scale = (w as f64 / setup.max_weight as f64) as f32;
    let scaled: Vec<f32> = result
        .params
        .values()
        .iter()
        .zip(global.values())
        .map(|(l, g)| (l - g) * scale)
        .collect();
    let mut q = setup.quantizer()?.quantize(&scaled, rng);
    q.push(w as u32);
    Ok(q)
}

/// The weighted sum the strategy receives, from the unmasked sum of `count` encoded inputs:
/// `Σ w·local = Σw · global + W · Σ (w/W)(local − global)`.
pub fn decode_sum(
    setup: &SecAggSetup,
    global: &Params,
    sum: &[u32],
    count: usize,
) -> Result<WeightedSum, Error> {
    let (weight, coords) = sum
        .split_last()
        .ok_or_else(|| sa(SecAggError::InvalidInput, "empty sum"))?;
    if coords.len() != global.len() {
        return Err(sa(
            SecAggError::InvalidInput,
            "unmasked sum has the wrong length",
        ));
    }
    let total = *weight as f64;
    if total <= 0.0 {
        return Err(sa(SecAggError::InvalidInput, "total weight is zero"));
    }
    let deq = setup.quantizer()?.dequantize_sum(coords, count as u64);
    let cap = setup.max_weight as f64;
    let values = deq
        .iter()
        .zip(global.values())
        .map(|(d, &g)| g as f64 * total + cap * d)
        .collect();
    Ok(WeightedSum {
        manifest: global.manifest().clone(),
        sum: values,
        total_weight: total,
        count,
    })
}

fn share_aad(round: u64, from: &ClientId, to: &ClientId) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + from.as_str().len() + to.as_str().len());
    a.extend_from_slice(b"flotilla share");
    a.extend_from_slice(&round.to_le_bytes());
    for id in [from, to] {
        a.extend_from_slice(&(id.as_str().len() as u32).to_le_bytes());
        a.extend_from_slice(id.as_str().as_bytes());
    }
    a
}

fn put_share(out: &mut Vec<u8>, s: &Share) {
    out.extend_from_slice(&s.x.to_le_bytes());
    for y in s.y {
        out.extend_from_slice(&y.to_le_bytes());
    }
}

fn get_share(b: &[u8]) -> Result<Share, Error> {
    let bad = || sa(SecAggError::BadShare, "malformed share");
    let x = u32::from_le_bytes(b.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(bad)?);
    let mut y = [0u64; 5];
    for (i, yi) in y.iter_mut().enumerate() {
        let at = 4 + 8 * i;
        *yi = u64::from_le_bytes(
            b.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(bad)?,
        );
    }
    Ok(Share { x, y })
}

fn direction(from: usize, to: usize) -> keys::Direction {
    if from < to {
        keys::Direction::Up
    } else {
        keys::Direction::Down
    }
}

/// Who must add `+PRG(s_uv)`: the client with the smaller index.
fn pair_sign(me: usize, other: usize) -> Sign {
    if me < other { Sign::Add } else { Sign::Sub }
}

/// A secure-aggregation error of `kind` (a variant of [`SecAggError`] holding text).
fn sa(kind: fn(String) -> SecAggError, why: impl Into<String>) -> Error {
    Error::SecAgg(kind(why.into()))
}

mod client;
mod server;
mod setup;

pub use client::{ClientRound, MaskJob};
pub use server::{Handled, SecAggStats, ServerRound, Stage, UnmaskJob, Unmasked};
