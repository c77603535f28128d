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

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flotilla_crypto::secagg::keys::{self, KeyPair};
use flotilla_crypto::secagg::mask::{self, Sign};
use flotilla_crypto::secagg::quantize::Quantizer;
use flotilla_crypto::secagg::shamir::{self, Share};
use flotilla_crypto::secagg::sign::{self as sig, PeerVerifier, Signer};
use flotilla_crypto::secagg::{Entropy, InsecureDeterministicEntropy, SystemEntropy};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;
use crate::messages::{
    AbortReason, Advertisement, ClientId, EncryptedShare, MaskedInput, Message, Metrics, TrainRes,
    UnmaskRequest,
};
use crate::params::Params;
use crate::strategy::{Failure, FailureReason, WeightedSum};

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
            return Err(Error::SecAgg(format!(
                "secure aggregation needs at least 2 clients, {n} sampled"
            )));
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
            return Err(Error::SecAgg(format!(
                "{n} clients × max_weight {} overflows 32 bits",
                self.max_weight
            )));
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

/// The parameters of one secure round, sent with `Train` and checked by every client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// The sampled clients, sorted; a client's index here is its position in the round.
    pub participants: Vec<ClientId>,
    /// Neighbours per client `k` (even, or `n − 1`).
    pub neighbours: u32,
    /// Threshold `t`, in `(k/2, k]`.
    pub threshold: u32,
    /// Clipping range `c`.
    pub clip: f32,
    /// Quantization bits `b`.
    pub bits: u32,
    /// Weight cap `W`.
    pub max_weight: u64,
    /// Seed of the neighbour graph.
    pub graph_seed: u64,
}

impl SecAggSetup {
    /// Number of participants.
    pub fn n(&self) -> usize {
        self.participants.len()
    }

    /// The quantizer of the round.
    pub fn quantizer(&self) -> Result<Quantizer, Error> {
        Ok(Quantizer::new(self.clip, self.bits)?)
    }

    /// Checks the parameters for consistency and safety (a client runs this on what the
    /// server sent).
    pub fn validate(&self) -> Result<(), Error> {
        let n = self.n();
        let bad = |s: String| Err(Error::SecAgg(format!("invalid round parameters: {s}")));
        if n < 2 {
            return bad(format!("{n} participants"));
        }
        if self.participants.windows(2).any(|w| w[0] >= w[1]) {
            return bad("participants not sorted and distinct".into());
        }
        let k = self.neighbours as usize;
        let t = self.threshold as usize;
        if k == 0 || k > n - 1 || (k % 2 == 1 && k != n - 1) {
            return bad(format!("{k} neighbours for {n} participants"));
        }
        if t <= k / 2 || t > k {
            return bad(format!("threshold {t} outside ({}, {k}]", k / 2));
        }
        let q = self.quantizer()?;
        q.check_capacity(n as u64)?;
        if self.max_weight == 0 || (n as u64).saturating_mul(self.max_weight) > u32::MAX as u64 {
            return bad(format!("max_weight {}", self.max_weight));
        }
        Ok(())
    }

    /// The neighbour lists of every participant (indices, sorted). `k = n − 1`: everyone.
    /// Otherwise a ring (Harary graph) over a seeded permutation: each client's neighbours
    /// are the `k/2` before and after it.
    pub fn graph(&self) -> Vec<Vec<usize>> {
        let n = self.n();
        let k = self.neighbours as usize;
        if k + 1 >= n {
            return (0..n)
                .map(|i| (0..n).filter(|&j| j != i).collect())
                .collect();
        }
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(self.graph_seed));
        let mut pos = vec![0usize; n];
        for (p, &i) in perm.iter().enumerate() {
            if let Some(slot) = pos.get_mut(i) {
                *slot = p;
            }
        }
        (0..n)
            .map(|i| {
                let p = pos.get(i).copied().unwrap_or(0);
                let mut v: Vec<usize> = (1..=k / 2)
                    .flat_map(|d| [(p + d) % n, (p + n - d) % n])
                    .filter_map(|q| perm.get(q).copied())
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect()
    }

    fn index_of(&self, id: &ClientId) -> Option<usize> {
        self.participants.binary_search(id).ok()
    }

    fn id(&self, i: usize) -> Result<&ClientId, Error> {
        self.participants
            .get(i)
            .ok_or_else(|| Error::SecAgg(format!("no participant {i}")))
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

/// Where a client's SecAgg randomness comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Randomness {
    /// The operating system's secure generator. The only choice for a deployment.
    System,
    /// **INSECURE**: keys, seeds, Shamir coefficients and rounding all derived from this
    /// public seed and the round, so tests and simulations are reproducible bit for bit.
    InsecureDeterministic(u64),
}

impl Randomness {
    fn entropy(&self, round: u64) -> Box<dyn Entropy + Send> {
        match *self {
            Randomness::System => Box::new(SystemEntropy::new()),
            Randomness::InsecureDeterministic(seed) => Box::new(InsecureDeterministicEntropy::new(
                seed,
                round.wrapping_mul(2),
            )),
        }
    }

    /// The generator of a client's stochastic rounding in `round`.
    pub fn input_rng(&self, round: u64) -> Result<ChaCha20Rng, Error> {
        let mut k = [0u8; 32];
        match *self {
            Randomness::System => SystemEntropy::new().fill(&mut k)?,
            Randomness::InsecureDeterministic(seed) => {
                InsecureDeterministicEntropy::new(seed, round.wrapping_mul(2).wrapping_add(1))
                    .fill(&mut k)?
            }
        }
        Ok(ChaCha20Rng::from_seed(k))
    }
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
        return Err(Error::SecAgg(
            "a secure update needs a positive weight".into(),
        ));
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
        .ok_or_else(|| Error::SecAgg("empty sum".into()))?;
    if coords.len() != global.len() {
        return Err(Error::SecAgg("unmasked sum has the wrong length".into()));
    }
    let total = *weight as f64;
    if total <= 0.0 {
        return Err(Error::SecAgg("total weight is zero".into()));
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
    let bad = || Error::SecAgg("malformed share".into());
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

fn sa(s: impl Into<String>) -> Error {
    Error::SecAgg(s.into())
}

#[derive(Debug)]
struct Peer {
    c_pk: [u8; 32],
    s_pk: [u8; 32],
    certificate: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientStage {
    Advertised,
    SharesSent,
    SharesReceived,
    MaskedSent,
    Signed,
    Revealed,
}

/// A client's side of one secure round. Every method that gets something from the server
/// checks it; an `Err` means the client must abort the round (the [`crate::Participant`] does).
pub struct ClientRound {
    round: u64,
    setup: SecAggSetup,
    me: usize,
    neighbours: BTreeSet<usize>,
    c: KeyPair,
    s: KeyPair,
    b: Zeroizing<[u8; 32]>,
    model: Params,
    model_hash: [u8; 32],
    peers: BTreeMap<usize, Peer>,
    /// Shares held for neighbours that shared keys: (share of `s`, share of `b`).
    held: BTreeMap<usize, (Share, Share)>,
    stage: ClientStage,
    result: Option<TrainRes>,
    signed: Option<Vec<ClientId>>,
    rng: ChaCha20Rng,
    entropy: Box<dyn Entropy + Send>,
}

impl std::fmt::Debug for ClientRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRound")
            .field("round", &self.round)
            .field("me", &self.me)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl ClientRound {
    /// Starts a round: checks the parameters, makes the key pairs and returns the signed
    /// advertisement to send.
    pub fn start(
        round: u64,
        setup: SecAggSetup,
        model: Params,
        me_id: &ClientId,
        identity: &SecAggIdentity,
        randomness: Randomness,
    ) -> Result<(Self, Message), Error> {
        setup.validate()?;
        let me = setup
            .index_of(me_id)
            .ok_or_else(|| sa("this client is not among the round's participants"))?;
        let neighbours: BTreeSet<usize> = setup
            .graph()
            .get(me)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut entropy = randomness.entropy(round);
        let c = KeyPair::generate(entropy.as_mut())?;
        let s = KeyPair::generate(entropy.as_mut())?;
        let mut b = Zeroizing::new([0u8; 32]);
        entropy.fill(b.as_mut())?;
        let model_hash = model.digest();
        let msg =
            sig::advertisement_bytes(round, me_id.as_str(), &model_hash, &c.public(), &s.public());
        let advert = Advertisement {
            round,
            client: me_id.clone(),
            c_pk: c.public(),
            s_pk: s.public(),
            certificate: identity.certificate.clone(),
            signature: identity.signer.sign(&msg)?,
        };
        Ok((
            Self {
                round,
                setup,
                me,
                neighbours,
                c,
                s,
                b,
                model,
                model_hash,
                peers: BTreeMap::new(),
                held: BTreeMap::new(),
                stage: ClientStage::Advertised,
                result: None,
                signed: None,
                rng: randomness.input_rng(round)?,
                entropy,
            },
            Message::AdvertiseKeys(advert),
        ))
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    fn expect(&self, stage: ClientStage, what: &str) -> Result<(), Error> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(sa(format!("{what} out of order (at {:?})", self.stage)))
        }
    }

    fn threshold(&self) -> usize {
        self.setup.threshold as usize
    }

    /// Phase 1: checks the neighbours' advertisements and returns the sealed shares.
    pub fn on_neighbour_keys(
        &mut self,
        adverts: Vec<Advertisement>,
        identity: &SecAggIdentity,
    ) -> Result<Message, Error> {
        self.expect(ClientStage::Advertised, "neighbour keys")?;
        for a in adverts {
            let v = self
                .setup
                .index_of(&a.client)
                .filter(|v| self.neighbours.contains(v))
                .ok_or_else(|| {
                    sa(format!(
                        "advertisement of {} who is not a neighbour",
                        a.client
                    ))
                })?;
            if a.round != self.round || self.peers.contains_key(&v) {
                return Err(sa(format!(
                    "stale or repeated advertisement of {}",
                    a.client
                )));
            }
            let named = identity.verifier.verify(&a.certificate)?;
            if named != a.client.as_str() {
                return Err(sa(format!(
                    "advertisement of {} carries the certificate of {named}",
                    a.client
                )));
            }
            // Signed over *our* model hash: fails if the neighbour saw another model.
            let msg = sig::advertisement_bytes(
                self.round,
                a.client.as_str(),
                &self.model_hash,
                &a.c_pk,
                &a.s_pk,
            );
            sig::verify(&a.certificate, &msg, &a.signature).map_err(|_| {
                sa(format!(
                    "advertisement of {} does not verify: forged, or it was sent another model",
                    a.client
                ))
            })?;
            self.peers.insert(
                v,
                Peer {
                    c_pk: a.c_pk,
                    s_pk: a.s_pk,
                    certificate: a.certificate,
                },
            );
        }
        if self.peers.len() < self.threshold() {
            return Err(sa(format!(
                "only {} neighbours advertised keys, {} needed",
                self.peers.len(),
                self.threshold()
            )));
        }
        let points: Vec<u32> = self.peers.keys().map(|&v| v as u32 + 1).collect();
        let t = self.threshold();
        let s_shares = shamir::split_at(&self.s.secret_bytes(), t, &points, self.entropy.as_mut())?;
        let b_shares = shamir::split_at(&self.b, t, &points, self.entropy.as_mut())?;
        let me_id = self.setup.id(self.me)?.clone();
        let mut shares = Vec::with_capacity(points.len());
        for ((v, peer), (ss, bs)) in self.peers.iter().zip(s_shares.iter().zip(&b_shares)) {
            let mut plain = Zeroizing::new(Vec::with_capacity(2 * SHARE_BYTES));
            put_share(&mut plain, ss);
            put_share(&mut plain, bs);
            let key = self.c.agree(&peer.c_pk, SHARE_PURPOSE)?;
            let to = self.setup.id(*v)?.clone();
            let ciphertext = keys::seal(
                &key,
                direction(self.me, *v),
                &share_aad(self.round, &me_id, &to),
                &plain,
            )?;
            shares.push(EncryptedShare {
                peer: to,
                ciphertext,
            });
        }
        self.stage = ClientStage::SharesSent;
        Ok(Message::ShareKeys {
            round: self.round,
            shares,
        })
    }

    /// Phase 1 (end): opens the shares the neighbours sent. Returns the masked input if the
    /// training result is already there.
    pub fn on_forward_shares(
        &mut self,
        shares: Vec<EncryptedShare>,
    ) -> Result<Option<Message>, Error> {
        self.expect(ClientStage::SharesSent, "forwarded shares")?;
        let me_id = self.setup.id(self.me)?.clone();
        for e in shares {
            let u = self
                .setup
                .index_of(&e.peer)
                .filter(|u| self.peers.contains_key(u))
                .ok_or_else(|| sa(format!("share from {} who did not advertise to us", e.peer)))?;
            if self.held.contains_key(&u) {
                return Err(sa(format!("two shares from {}", e.peer)));
            }
            let peer = self.peers.get(&u).ok_or_else(|| sa("unknown peer"))?;
            let key = self.c.agree(&peer.c_pk, SHARE_PURPOSE)?;
            let plain = keys::open(
                &key,
                direction(u, self.me),
                &share_aad(self.round, &e.peer, &me_id),
                &e.ciphertext,
            )
            .map_err(|_| sa(format!("share from {} does not open", e.peer)))?;
            let ss = get_share(plain.get(..SHARE_BYTES).unwrap_or(&[]))?;
            let bs = get_share(plain.get(SHARE_BYTES..).unwrap_or(&[]))?;
            let point = self.me as u32 + 1;
            if ss.x != point || bs.x != point || plain.len() != 2 * SHARE_BYTES {
                return Err(sa(format!("share from {} is for another point", e.peer)));
            }
            self.held.insert(u, (ss, bs));
        }
        if self.held.len() < self.threshold() {
            return Err(sa(format!(
                "only {} neighbours shared keys, {} needed",
                self.held.len(),
                self.threshold()
            )));
        }
        self.stage = ClientStage::SharesReceived;
        self.try_mask()
    }

    /// Phase 2: the local training result. Returns the masked input once the shares are in.
    pub fn on_result(&mut self, result: TrainRes) -> Result<Option<Message>, Error> {
        if self.result.is_some() || result.round != self.round {
            return Err(sa("unexpected training result"));
        }
        self.result = Some(result);
        self.try_mask()
    }

    fn try_mask(&mut self) -> Result<Option<Message>, Error> {
        if self.stage != ClientStage::SharesReceived {
            return Ok(None);
        }
        let Some(result) = self.result.take() else {
            return Ok(None);
        };
        let mut values = encode_input(&self.setup, &self.model, &result, &mut self.rng)?;
        mask::apply(&self.b, &mut values, Sign::Add);
        for v in self.held.keys() {
            let peer = self.peers.get(v).ok_or_else(|| sa("unknown peer"))?;
            let seed = self.s.agree(&peer.s_pk, MASK_PURPOSE)?;
            mask::apply(&seed, &mut values, pair_sign(self.me, *v));
        }
        self.stage = ClientStage::MaskedSent;
        Ok(Some(Message::MaskedInput(MaskedInput {
            round: self.round,
            metrics: result.metrics,
            values,
        })))
    }

    /// Phase 3a: checks and signs the survivor list.
    pub fn on_survivors(
        &mut self,
        survivors: Vec<ClientId>,
        identity: &SecAggIdentity,
    ) -> Result<Message, Error> {
        self.expect(ClientStage::MaskedSent, "survivor list")?;
        if survivors.windows(2).any(|w| w[0] >= w[1]) {
            return Err(sa("survivor list not sorted and distinct"));
        }
        let mut live_neighbours = 0;
        let mut includes_me = false;
        for id in &survivors {
            let i = self
                .setup
                .index_of(id)
                .ok_or_else(|| sa(format!("survivor {id} is not a participant")))?;
            includes_me |= i == self.me;
            if self.neighbours.contains(&i) {
                live_neighbours += 1;
            }
        }
        if !includes_me {
            return Err(sa("survivor list without us"));
        }
        if live_neighbours < self.threshold() {
            return Err(sa(format!(
                "only {live_neighbours} neighbours survived, {} needed",
                self.threshold()
            )));
        }
        let names: Vec<&str> = survivors.iter().map(ClientId::as_str).collect();
        let signature = identity
            .signer
            .sign(&sig::survivors_bytes(self.round, &names))?;
        self.signed = Some(survivors);
        self.stage = ClientStage::Signed;
        Ok(Message::SurvivorsSigned {
            round: self.round,
            signature,
        })
    }

    /// Phase 3b: reveals shares — of `b_v` for survivors, of `s_v` for the dropped, never both
    /// for one client, and only once per round.
    pub fn on_unmask(&mut self, req: UnmaskRequest) -> Result<Message, Error> {
        if self.stage == ClientStage::Revealed {
            return Err(sa("a second unmask request in one round: refused"));
        }
        self.expect(ClientStage::Signed, "unmask request")?;
        let signed = self.signed.as_ref().ok_or_else(|| sa("nothing signed"))?;
        if &req.survivors != signed {
            return Err(sa(
                "unmask request with another survivor list than the one signed",
            ));
        }
        let survivors: BTreeSet<usize> = req
            .survivors
            .iter()
            .filter_map(|id| self.setup.index_of(id))
            .collect();
        let mut dropped = BTreeSet::new();
        for id in &req.dropped {
            let v = self
                .setup
                .index_of(id)
                .ok_or_else(|| sa(format!("dropped {id} is not a participant")))?;
            if survivors.contains(&v) {
                return Err(sa(format!(
                    "asked for both shares of {id} (as survivor and as dropped): refused"
                )));
            }
            dropped.insert(v);
        }
        // Consistency: at least t neighbours signed the very list we signed.
        let names: Vec<&str> = req.survivors.iter().map(ClientId::as_str).collect();
        let msg = sig::survivors_bytes(self.round, &names);
        let mut vouched = BTreeSet::new();
        for (id, signature) in &req.signatures {
            let v = self
                .setup
                .index_of(id)
                .filter(|v| survivors.contains(v))
                .ok_or_else(|| sa(format!("signature of {id}, who is not a survivor")))?;
            let peer = self
                .peers
                .get(&v)
                .ok_or_else(|| sa(format!("signature of {id}, who is not a neighbour")))?;
            sig::verify(&peer.certificate, &msg, signature)
                .map_err(|_| sa(format!("survivor-list signature of {id} does not verify")))?;
            vouched.insert(v);
        }
        if vouched.len() < self.threshold() {
            return Err(sa(format!(
                "only {} neighbours vouched for the survivor list, {} needed",
                vouched.len(),
                self.threshold()
            )));
        }
        let mut self_mask = Vec::new();
        let mut keys = Vec::new();
        for (v, (ss, bs)) in &self.held {
            let id = self.setup.id(*v)?.clone();
            if survivors.contains(v) {
                self_mask.push((id, bs.clone()));
            } else if dropped.contains(v) {
                keys.push((id, ss.clone()));
            }
        }
        self.stage = ClientStage::Revealed;
        Ok(Message::UnmaskShares {
            round: self.round,
            self_mask,
            keys,
        })
    }
}

/// Where the server's side of a secure round is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Waiting for key advertisements.
    AdvertiseKeys,
    /// Waiting for sealed shares.
    ShareKeys,
    /// Waiting for masked inputs.
    MaskedInput,
    /// Waiting for survivor-list signatures.
    Consistency,
    /// Waiting for revealed shares.
    Unmask,
    /// Finished (result or abort).
    Done,
}

fn stage_of(msg: &Message) -> Option<Stage> {
    Some(match msg {
        Message::AdvertiseKeys(_) => Stage::AdvertiseKeys,
        Message::ShareKeys { .. } => Stage::ShareKeys,
        Message::MaskedInput(_) => Stage::MaskedInput,
        Message::SurvivorsSigned { .. } => Stage::Consistency,
        Message::UnmaskShares { .. } => Stage::Unmask,
        _ => return None,
    })
}

/// Sizes of the client sets of a finished secure round (Bonawitz et al.'s U1..U4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggStats {
    /// Participants sampled.
    pub participants: usize,
    /// Neighbours per client.
    pub neighbours: usize,
    /// Threshold.
    pub threshold: usize,
    /// Quantization bits used.
    pub bits: u32,
    /// Advertised keys (U1).
    pub advertised: usize,
    /// Shared keys (U2).
    pub shared: usize,
    /// Sent masked inputs (U3): the clients in the sum.
    pub masked: usize,
    /// Signed the survivor list (U4).
    pub signed: usize,
    /// Dropped clients whose pairwise masks were removed.
    pub recovered_dropped: usize,
}

/// The server's result of a secure round.
#[derive(Clone, Debug, PartialEq)]
pub struct Unmasked {
    /// The unmasked sum of the encoded inputs (one word per parameter, then `Σ w`).
    pub sum: Vec<u32>,
    /// Clients in the sum.
    pub contributors: Vec<ClientId>,
    /// Their training metrics.
    pub metrics: Vec<Metrics>,
}

/// What a message did to a [`ServerRound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// It was taken.
    Taken,
    /// It was for a stage already closed (late or duplicate), and ignored.
    Late,
}

/// The server's side of one secure round. See the module docs.
pub struct ServerRound {
    round: u64,
    setup: SecAggSetup,
    graph: Vec<Vec<usize>>,
    stage: Stage,
    deadline: Instant,
    collect_deadline: Instant,
    phase_timeout: Duration,
    min_results: usize,
    expected_len: usize,
    pending: BTreeSet<usize>,
    gone: BTreeSet<usize>,
    reasons: BTreeMap<usize, FailureReason>,
    adverts: BTreeMap<usize, Advertisement>,
    shares: BTreeMap<usize, Vec<EncryptedShare>>,
    u2: BTreeSet<usize>,
    sum: Vec<u32>,
    u3: BTreeSet<usize>,
    metrics: Vec<Metrics>,
    signatures: BTreeMap<usize, Vec<u8>>,
    b_shares: BTreeMap<usize, Vec<Share>>,
    s_shares: BTreeMap<usize, Vec<Share>>,
    out: Vec<(ClientId, Message)>,
    outcome: Option<Result<Unmasked, AbortReason>>,
    stats: SecAggStats,
    entered: Option<Stage>,
}

impl std::fmt::Debug for ServerRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRound")
            .field("round", &self.round)
            .field("stage", &self.stage)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl ServerRound {
    /// A round whose `Train` messages (carrying `setup`) have just been sent. `params_len`:
    /// parameters of the model; `min_results`: inputs needed for the sum to count;
    /// `collect_deadline`: when masked-input collection stops waiting.
    pub fn new(
        round: u64,
        setup: SecAggSetup,
        now: Instant,
        phase_timeout: Duration,
        collect_deadline: Instant,
        params_len: usize,
        min_results: usize,
    ) -> Self {
        let n = setup.n();
        let stats = SecAggStats {
            participants: n,
            neighbours: setup.neighbours as usize,
            threshold: setup.threshold as usize,
            bits: setup.bits,
            ..SecAggStats::default()
        };
        Self {
            round,
            graph: setup.graph(),
            setup,
            stage: Stage::AdvertiseKeys,
            deadline: now + phase_timeout,
            collect_deadline,
            phase_timeout,
            min_results: min_results.max(1),
            expected_len: params_len + 1,
            pending: (0..n).collect(),
            gone: BTreeSet::new(),
            reasons: BTreeMap::new(),
            adverts: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            sum: Vec::new(),
            u3: BTreeSet::new(),
            metrics: Vec::new(),
            signatures: BTreeMap::new(),
            b_shares: BTreeMap::new(),
            s_shares: BTreeMap::new(),
            out: Vec::new(),
            outcome: None,
            stats,
            entered: None,
        }
    }

    /// The stage entered since the last call, if any (for progress reports).
    pub fn take_stage_change(&mut self) -> Option<Stage> {
        self.entered.take()
    }

    /// The round's parameters.
    pub fn setup(&self) -> &SecAggSetup {
        &self.setup
    }

    /// Current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// When [`ServerRound::handle_timeout`] is next needed.
    pub fn deadline(&self) -> Option<Instant> {
        (self.stage != Stage::Done).then_some(self.deadline)
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> Vec<(ClientId, Message)> {
        std::mem::take(&mut self.out)
    }

    /// The result, once the round is done: the unmasked sum, or why it was aborted.
    pub fn take_outcome(&mut self) -> Option<Result<Unmasked, AbortReason>> {
        self.outcome.take()
    }

    /// Set sizes, for the round record.
    pub fn stats(&self) -> &SecAggStats {
        &self.stats
    }

    /// Sampled clients that are not in the sum, and why.
    pub fn failures(&self) -> Vec<Failure> {
        self.setup
            .participants
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.u3.contains(i))
            .map(|(i, id)| Failure {
                client: id.clone(),
                reason: self
                    .reasons
                    .get(&i)
                    .cloned()
                    .unwrap_or(FailureReason::Timeout),
            })
            .collect()
    }

    /// True if `client` is a participant still expected to take part.
    pub fn is_live(&self, client: &ClientId) -> bool {
        self.setup
            .index_of(client)
            .is_some_and(|i| !self.gone.contains(&i) && self.stage != Stage::Done)
    }

    /// `client` is gone (dropped, disconnected, or it aborted).
    pub fn handle_failure(&mut self, now: Instant, client: &ClientId, reason: FailureReason) {
        let Some(i) = self.setup.index_of(client) else {
            return;
        };
        if self.stage == Stage::Done || !self.gone.insert(i) {
            return;
        }
        self.reasons.entry(i).or_insert(reason);
        if self.pending.remove(&i) && self.pending.is_empty() {
            self.advance(now);
        }
    }

    /// The stage's deadline passed: whoever has not answered is out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stage != Stage::Done && now >= self.deadline {
            for i in std::mem::take(&mut self.pending) {
                self.reasons.entry(i).or_insert(FailureReason::Timeout);
                self.gone.insert(i);
                if let Some(id) = self.setup.participants.get(i) {
                    self.out.push((
                        id.clone(),
                        Message::Abort {
                            round: Some(self.round),
                            reason: AbortReason::SecureAggregation(format!(
                                "too slow at {:?}; left out of the round",
                                self.stage
                            )),
                        },
                    ));
                }
            }
            self.advance(now);
        }
    }

    /// A SecAgg message from `from`. `Err`: a protocol violation (drop the sender).
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<Handled, Error> {
        let i = self.setup.index_of(from).ok_or_else(|| {
            sa(format!(
                "{} is not a participant of round {}",
                from, self.round
            ))
        })?;
        let stage = stage_of(&msg)
            .ok_or_else(|| sa(format!("{} is not a client SecAgg message", msg.kind())))?;
        if self.gone.contains(&i) || stage < self.stage {
            return Ok(Handled::Late);
        }
        if stage > self.stage {
            return Err(sa(format!(
                "{} during {:?}: out of order",
                msg.kind(),
                self.stage
            )));
        }
        if !self.pending.contains(&i) {
            return Ok(Handled::Late); // a duplicate
        }
        match msg {
            Message::AdvertiseKeys(a) => self.on_advert(i, from, a)?,
            Message::ShareKeys { shares, .. } => self.on_shares(i, shares)?,
            Message::MaskedInput(m) => self.on_masked(i, m)?,
            Message::SurvivorsSigned { signature, .. } => self.on_signature(i, signature)?,
            Message::UnmaskShares {
                self_mask, keys, ..
            } => self.on_unmask_shares(i, self_mask, keys)?,
            _ => return Err(sa("unexpected message")),
        }
        self.pending.remove(&i);
        if self.pending.is_empty() || (self.stage == Stage::Unmask && self.can_reconstruct()) {
            self.advance(now);
        }
        Ok(Handled::Taken)
    }

    fn neighbours(&self, i: usize) -> &[usize] {
        self.graph.get(i).map(Vec::as_slice).unwrap_or(&[])
    }

    fn on_advert(&mut self, i: usize, from: &ClientId, a: Advertisement) -> Result<(), Error> {
        if &a.client != from {
            return Err(sa(format!("{from} advertised keys as {}", a.client)));
        }
        if a.certificate.len() > MAX_CERTIFICATE_BYTES || a.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(sa("oversized advertisement"));
        }
        self.adverts.insert(i, a);
        Ok(())
    }

    fn on_shares(&mut self, i: usize, shares: Vec<EncryptedShare>) -> Result<(), Error> {
        let want: BTreeSet<&ClientId> = self
            .neighbours(i)
            .iter()
            .filter(|v| self.adverts.contains_key(v))
            .filter_map(|&v| self.setup.participants.get(v))
            .collect();
        let got: BTreeSet<&ClientId> = shares.iter().map(|s| &s.peer).collect();
        if got.len() != shares.len() || got != want {
            return Err(sa(
                "shares must go to exactly the neighbours that advertised keys",
            ));
        }
        if shares
            .iter()
            .any(|s| s.ciphertext.len() != SEALED_SHARE_BYTES)
        {
            return Err(sa("sealed share of the wrong size"));
        }
        self.shares.insert(i, shares);
        Ok(())
    }

    fn on_masked(&mut self, i: usize, m: MaskedInput) -> Result<(), Error> {
        if m.values.len() != self.expected_len {
            return Err(Error::PayloadLengthMismatch {
                expected: self.expected_len as u64 * 4,
                got: m.values.len() as u64 * 4,
            });
        }
        if m.metrics.values().any(|v| !v.is_finite()) {
            return Err(sa("non-finite metric"));
        }
        if self.sum.is_empty() {
            self.sum = m.values;
        } else {
            for (s, v) in self.sum.iter_mut().zip(&m.values) {
                *s = s.wrapping_add(*v);
            }
        }
        self.u3.insert(i);
        self.metrics.push(m.metrics);
        Ok(())
    }

    fn on_signature(&mut self, i: usize, signature: Vec<u8>) -> Result<(), Error> {
        let cert = self
            .adverts
            .get(&i)
            .map(|a| a.certificate.as_slice())
            .ok_or_else(|| sa("signature from a client without keys"))?;
        let names: Vec<&str> = self
            .u3
            .iter()
            .filter_map(|&u| self.setup.participants.get(u))
            .map(ClientId::as_str)
            .collect();
        sig::verify(cert, &sig::survivors_bytes(self.round, &names), &signature)
            .map_err(|_| sa("survivor-list signature does not verify"))?;
        self.signatures.insert(i, signature);
        Ok(())
    }

    fn on_unmask_shares(
        &mut self,
        i: usize,
        self_mask: Vec<(ClientId, Share)>,
        keys: Vec<(ClientId, Share)>,
    ) -> Result<(), Error> {
        let point = i as u32 + 1;
        let nb: BTreeSet<usize> = self.neighbours(i).iter().copied().collect();
        let mut seen = BTreeSet::new();
        let mut take =
            |list: Vec<(ClientId, Share)>, survivor: bool| -> Result<Vec<(usize, Share)>, Error> {
                let mut out = Vec::with_capacity(list.len());
                for (id, share) in list {
                    let v = self
                        .setup
                        .index_of(&id)
                        .filter(|v| nb.contains(v) && self.u2.contains(v))
                        .ok_or_else(|| {
                            sa(format!("share of {id}, not a neighbour that shared keys"))
                        })?;
                    if self.u3.contains(&v) != survivor || !seen.insert(v) {
                        return Err(sa(format!("share of {id} of the wrong kind or repeated")));
                    }
                    if share.x != point {
                        return Err(sa("revealed share for another point"));
                    }
                    out.push((v, share));
                }
                Ok(out)
            };
        let b = take(self_mask, true)?;
        let s = take(keys, false)?;
        for (v, share) in b {
            self.b_shares.entry(v).or_default().push(share);
        }
        for (v, share) in s {
            self.s_shares.entry(v).or_default().push(share);
        }
        Ok(())
    }

    /// Dropped clients (shared keys, sent no input) with a neighbour in the sum: their
    /// pairwise masks must be removed.
    fn dropped_to_recover(&self) -> Vec<usize> {
        self.u2
            .iter()
            .copied()
            .filter(|v| !self.u3.contains(v))
            .filter(|&v| self.neighbours(v).iter().any(|u| self.u3.contains(u)))
            .collect()
    }

    fn can_reconstruct(&self) -> bool {
        let t = self.setup.threshold as usize;
        self.u3
            .iter()
            .all(|u| self.b_shares.get(u).is_some_and(|s| s.len() >= t))
            && self
                .dropped_to_recover()
                .iter()
                .all(|v| self.s_shares.get(v).is_some_and(|s| s.len() >= t))
    }

    /// Checks that every secret the unmasking needs has at least `t` holders in `alive`.
    fn recoverable_with(&self, alive: &BTreeSet<usize>) -> Result<(), String> {
        let t = self.setup.threshold as usize;
        let holders = |v: usize| {
            self.neighbours(v)
                .iter()
                .filter(|u| alive.contains(u) && self.u2.contains(u))
                .count()
        };
        for u in self.u3.iter().copied().chain(self.dropped_to_recover()) {
            let h = holders(u);
            if h < t {
                let id = self.setup.participants.get(u).map_or("?", ClientId::as_str);
                return Err(format!(
                    "{id} has {h} live neighbours holding its shares, {t} needed"
                ));
            }
        }
        Ok(())
    }

    fn abort(&mut self, reason: AbortReason) {
        let live: Vec<ClientId> = self
            .setup
            .participants
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.gone.contains(i))
            .map(|(_, id)| id.clone())
            .collect();
        for id in live {
            self.out.push((
                id,
                Message::Abort {
                    round: Some(self.round),
                    reason: reason.clone(),
                },
            ));
        }
        self.stage = Stage::Done;
        self.pending.clear();
        self.sum = Vec::new();
        self.outcome = Some(Err(reason));
    }

    fn live(&self, set: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
        set.into_iter().filter(|i| !self.gone.contains(i)).collect()
    }

    fn too_few(&mut self, available: usize) -> bool {
        if available < self.min_results {
            self.abort(AbortReason::TooFewClients {
                available: available as u64,
                required: self.min_results as u64,
            });
            return true;
        }
        false
    }

    fn advance(&mut self, now: Instant) {
        self.pending.clear();
        match self.stage {
            Stage::AdvertiseKeys => {
                self.stats.advertised = self.adverts.len();
                let u1 = self.live(self.adverts.keys().copied());
                if self.too_few(u1.len()) {
                    return;
                }
                for &u in &u1 {
                    let adverts: Vec<Advertisement> = self
                        .neighbours(u)
                        .iter()
                        .filter_map(|v| self.adverts.get(v).cloned())
                        .collect();
                    if let Err(why) = fits_in_a_control_message(self.round, &adverts) {
                        // Grows with the number of neighbours (classic SecAgg: all clients):
                        // say so, rather than failing to send and aborting as "too few".
                        self.abort(AbortReason::SecureAggregation(why));
                        return;
                    }
                    if let Some(id) = self.setup.participants.get(u) {
                        self.out.push((
                            id.clone(),
                            Message::NeighbourKeys {
                                round: self.round,
                                adverts,
                            },
                        ));
                    }
                }
                self.stage = Stage::ShareKeys;
                self.entered = Some(Stage::ShareKeys);
                self.deadline = now + self.phase_timeout;
                self.pending = u1;
            }
            Stage::ShareKeys => {
                self.u2 = self.shares.keys().copied().collect();
                self.stats.shared = self.u2.len();
                let u2_live = self.live(self.u2.iter().copied());
                if self.too_few(u2_live.len()) {
                    return;
                }
                for &v in &u2_live {
                    let Some(v_id) = self.setup.participants.get(v).cloned() else {
                        continue;
                    };
                    let mut forwarded = Vec::new();
                    for u in self.neighbours(v) {
                        let (Some(list), Some(u_id)) =
                            (self.shares.get(u), self.setup.participants.get(*u))
                        else {
                            continue;
                        };
                        if let Some(s) = list.iter().find(|s| s.peer == v_id) {
                            forwarded.push(EncryptedShare {
                                peer: u_id.clone(),
                                ciphertext: s.ciphertext.clone(),
                            });
                        }
                    }
                    self.out.push((
                        v_id,
                        Message::ForwardShares {
                            round: self.round,
                            shares: forwarded,
                        },
                    ));
                }
                self.shares.clear();
                self.stage = Stage::MaskedInput;
                self.entered = Some(Stage::MaskedInput);
                self.deadline = self.collect_deadline.max(now);
                self.pending = u2_live;
            }
            Stage::MaskedInput => {
                self.stats.masked = self.u3.len();
                if self.too_few(self.u3.len()) {
                    return;
                }
                // Abort now, before anyone reveals anything, if the sum cannot be unmasked.
                let alive = self.live(self.u3.iter().copied());
                if let Err(why) = self.recoverable_with(&alive) {
                    self.abort(AbortReason::SecureAggregation(format!(
                        "too many dropouts: {why}"
                    )));
                    return;
                }
                let survivors: Vec<ClientId> = self
                    .u3
                    .iter()
                    .filter_map(|&u| self.setup.participants.get(u).cloned())
                    .collect();
                for &u in &alive {
                    if let Some(id) = self.setup.participants.get(u) {
                        self.out.push((
                            id.clone(),
                            Message::Survivors {
                                round: self.round,
                                survivors: survivors.clone(),
                            },
                        ));
                    }
                }
                self.stage = Stage::Consistency;
                self.entered = Some(Stage::Consistency);
                self.deadline = now + self.phase_timeout;
                self.pending = alive;
            }
            Stage::Consistency => {
                let u4 = self.live(self.signatures.keys().copied());
                self.stats.signed = u4.len();
                if let Err(why) = self.recoverable_with(&u4) {
                    self.abort(AbortReason::SecureAggregation(format!(
                        "too many dropouts: {why}"
                    )));
                    return;
                }
                let survivors: Vec<ClientId> = self
                    .u3
                    .iter()
                    .filter_map(|&u| self.setup.participants.get(u).cloned())
                    .collect();
                let dropped: Vec<ClientId> = self
                    .u2
                    .iter()
                    .filter(|v| !self.u3.contains(v))
                    .filter_map(|&v| self.setup.participants.get(v).cloned())
                    .collect();
                for &u in &u4 {
                    let signatures = self
                        .neighbours(u)
                        .iter()
                        .filter(|v| u4.contains(v))
                        .filter_map(|v| {
                            Some((
                                self.setup.participants.get(*v)?.clone(),
                                self.signatures.get(v)?.clone(),
                            ))
                        })
                        .collect();
                    if let Some(id) = self.setup.participants.get(u) {
                        self.out.push((
                            id.clone(),
                            Message::Unmask(UnmaskRequest {
                                round: self.round,
                                survivors: survivors.clone(),
                                dropped: dropped.clone(),
                                signatures,
                            }),
                        ));
                    }
                }
                self.stage = Stage::Unmask;
                self.entered = Some(Stage::Unmask);
                self.deadline = now + self.phase_timeout;
                self.pending = u4;
            }
            Stage::Unmask => self.finish(),
            Stage::Done => {}
        }
    }

    fn finish(&mut self) {
        match self.unmask() {
            Ok(u) => {
                self.stage = Stage::Done;
                self.outcome = Some(Ok(u));
            }
            Err(e) => self.abort(AbortReason::SecureAggregation(e.to_string())),
        }
    }

    fn unmask(&mut self) -> Result<Unmasked, Error> {
        let t = self.setup.threshold as usize;
        let mut sum = std::mem::take(&mut self.sum);
        if sum.len() != self.expected_len {
            return Err(sa("no masked inputs"));
        }
        let mut masks: Vec<([u8; 32], Sign)> = Vec::with_capacity(self.u3.len());
        for &u in &self.u3 {
            let shares = self.b_shares.get(&u).map(Vec::as_slice).unwrap_or(&[]);
            let b = shamir::recover(shares, t).map_err(|e| {
                sa(format!(
                    "too many dropouts: self mask of {}: {e}",
                    self.setup.id(u).map_or("?", ClientId::as_str)
                ))
            })?;
            masks.push((b, Sign::Sub));
        }
        // Dropped clients: rebuild their mask keys, then the seeds they shared with each
        // survivor among their neighbours.
        let dropped = self.dropped_to_recover();
        let mut secrets = Vec::with_capacity(dropped.len());
        let mut pairs: Vec<(usize, [u8; 32], Sign)> = Vec::new();
        for &v in &dropped {
            let shares = self.s_shares.get(&v).map(Vec::as_slice).unwrap_or(&[]);
            let secret = Zeroizing::new(shamir::recover(shares, t).map_err(|e| {
                sa(format!(
                    "too many dropouts: mask key of {}: {e}",
                    self.setup.id(v).map_or("?", ClientId::as_str)
                ))
            })?);
            let advert = self
                .adverts
                .get(&v)
                .ok_or_else(|| sa("dropped client without keys"))?;
            if KeyPair::from_secret(*secret).public() != advert.s_pk {
                return Err(sa(format!(
                    "reconstructed mask key of {} does not match its advertisement",
                    advert.client
                )));
            }
            for &u in self.neighbours(v) {
                if let (true, Some(peer)) = (self.u3.contains(&u), self.adverts.get(&u)) {
                    // u added +PRG if u < v: take it off with the opposite sign.
                    let sign = match pair_sign(u, v) {
                        Sign::Add => Sign::Sub,
                        Sign::Sub => Sign::Add,
                    };
                    pairs.push((secrets.len(), peer.s_pk, sign));
                }
            }
            secrets.push(secret);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        masks.extend(derive_pair_seeds(&secrets, &pairs, threads)?);
        mask::apply_all(&masks, &mut sum, threads);
        self.stats.recovered_dropped = dropped.len();
        Ok(Unmasked {
            sum,
            contributors: self
                .u3
                .iter()
                .filter_map(|&u| self.setup.participants.get(u).cloned())
                .collect(),
            metrics: std::mem::take(&mut self.metrics),
        })
    }
}

/// The pairwise seeds `HKDF(X25519(s_v, s_u))` for `(v, s_u public key, sign)` triples
/// grouped by `v`, computed on `threads` threads (each X25519 costs tens of microseconds,
/// and classic SecAgg with many dropouts needs tens of thousands).
fn derive_pair_seeds(
    secrets: &[Zeroizing<[u8; 32]>],
    pairs: &[(usize, [u8; 32], Sign)],
    threads: usize,
) -> Result<Vec<([u8; 32], Sign)>, Error> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let per = pairs.len().div_ceil(threads.max(1)).max(64);
    let results: Vec<Result<Vec<([u8; 32], Sign)>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len());
                    let mut current: Option<(usize, KeyPair)> = None;
                    for (v, pk, sign) in chunk {
                        if current.as_ref().is_none_or(|(i, _)| i != v) {
                            let secret = secrets.get(*v).ok_or_else(|| sa("no such secret"))?;
                            current = Some((*v, KeyPair::from_secret(**secret)));
                        }
                        if let Some((_, key)) = &current {
                            out.push((*key.agree(pk, MASK_PURPOSE)?, *sign));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(sa("a worker thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(pairs.len());
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// Whether the neighbour keys for one client fit in one control message (1 MiB). Checked
/// with an upper bound first (no encoding on the common path), exactly only near the cap.
fn fits_in_a_control_message(round: u64, adverts: &[Advertisement]) -> Result<(), String> {
    let cap = crate::codec::DEFAULT_MAX_CONTROL_BYTES as usize;
    // postcard: varints of at most 10 bytes, fixed-size keys, length-prefixed bytes.
    let bound: usize = 32
        + adverts
            .iter()
            .map(|a| {
                10 + 10
                    + a.client.as_str().len()
                    + 64
                    + 10
                    + a.certificate.len()
                    + 10
                    + a.signature.len()
            })
            .sum::<usize>();
    if bound <= cap {
        return Ok(());
    }
    let msg = Message::NeighbourKeys {
        round,
        adverts: adverts.to_vec(),
    };
    match crate::codec::encode(&msg) {
        Ok(_) => Ok(()),
        Err(e) => {
            let per = bound / adverts.len().max(1);
            Err(format!(
                "the key advertisements of {} neighbours do not fit in one control message ({e}); \
                 lower secure_aggregation.neighbours (SecAgg+) to at most about {}",
                adverts.len(),
                (cap / per.max(1)).saturating_sub(1) & !1
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn advert(i: usize) -> Advertisement {
        Advertisement {
            round: 1,
            client: ClientId::new(format!("client-{i:05}")),
            c_pk: [1; 32],
            s_pk: [2; 32],
            certificate: vec![3; 600],
            signature: vec![4; 72],
        }
    }

    #[test]
    fn neighbour_keys_that_outgrow_a_control_message_name_the_cause() {
        let few: Vec<Advertisement> = (0..100).map(advert).collect();
        assert_eq!(fits_in_a_control_message(1, &few), Ok(()));
        // Classic SecAgg among 1,643 clients: 1,642 neighbours' adverts.
        let many: Vec<Advertisement> = (0..1642).map(advert).collect();
        let why = fits_in_a_control_message(1, &many).unwrap_err();
        assert!(
            why.starts_with(
                "the key advertisements of 1642 neighbours do not fit in one control message"
            ),
            "{why}"
        );
        assert!(why.contains("lower secure_aggregation.neighbours"), "{why}");
        // Near the cap the check is exact: what it accepts encodes.
        let n = (0..2000)
            .take_while(|k| {
                let v: Vec<Advertisement> = (0..*k).map(advert).collect();
                fits_in_a_control_message(1, &v).is_ok()
            })
            .count();
        // (`count` counts the sizes 0..n that fit: the largest is n - 1.)
        let largest = n - 1;
        let edge: Vec<Advertisement> = (0..largest).map(advert).collect();
        let msg = Message::NeighbourKeys {
            round: 1,
            adverts: edge,
        };
        assert!(
            crate::codec::encode(&msg).is_ok(),
            "{n} adverts were accepted"
        );
    }
}
