//! The server's side of a SecAgg+ round: relaying keys and shares, collecting masked inputs,
//! choosing survivors, reconstructing and removing the masks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flotilla_crypto::secagg::keys::KeyPair;
use flotilla_crypto::secagg::mask::{self, Sign};
use flotilla_crypto::secagg::shamir::{self, Share};
use flotilla_crypto::secagg::sign::{self as sig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    MASK_PURPOSE, MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES, SEALED_SHARE_BYTES, pair_sign, sa,
};
use crate::strategy::{Failure, FailureReason};
use crate::wire::config::SecAggSetup;
use crate::wire::messages::{
    AbortReason, Advertisement, ClientId, EncryptedShare, MaskedInput, Message, Metrics,
    UnmaskRequest,
};
use crate::{Error, SecAggError};

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
    /// Every share needed is in: the masks are being removed by a job off the event loop
    /// ([`ServerRound::take_job`]); nothing but its result moves the round.
    Unmasking,
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
    /// The reconstruct-and-unmask work, ready for the driver ([`ServerRound::take_job`]).
    job: Option<UnmaskJob>,
    /// Masked-input collection closes once this many inputs are in (the rest are left out
    /// as dropouts); `usize::MAX`: it waits for every live client or the deadline.
    collect_target: usize,
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
            job: None,
            collect_target: usize::MAX,
        }
    }

    /// Closes masked-input collection as soon as `target` inputs are in: the clients still
    /// training are left out of the sum as dropouts (their pairwise masks are removed with
    /// their neighbours' shares, as for any dropout; their self masks are never asked for).
    /// The asynchronous engine's cohorts use it so that a cohort waits for its `target`
    /// fastest members, not its slowest.
    pub fn with_collect_target(mut self, target: usize) -> Self {
        self.collect_target = target.max(1);
        self
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
        (self.stage < Stage::Unmasking).then_some(self.deadline)
    }

    /// The unmask work, once every share needed is in: reconstructing the secrets and
    /// removing the masks takes seconds at hundreds of clients, so it runs off the event
    /// loop. Its result goes to [`ServerRound::handle_unmask_result`].
    pub fn take_job(&mut self) -> Option<UnmaskJob> {
        self.job.take()
    }

    /// The result of the job from [`ServerRound::take_job`]: the unmasked sum, or why it
    /// could not be computed (the round aborts).
    pub fn handle_unmask_result(&mut self, result: Result<Vec<u32>, Error>) {
        if self.stage != Stage::Unmasking {
            return;
        }
        match result {
            Ok(sum) => {
                self.stage = Stage::Done;
                self.outcome = Some(Ok(Unmasked {
                    sum,
                    contributors: self
                        .u3
                        .iter()
                        .filter_map(|&u| self.setup.participants.get(u).cloned())
                        .collect(),
                    metrics: std::mem::take(&mut self.metrics),
                }));
            }
            Err(e) => self.abort(AbortReason::SecureAggregation(e.to_string())),
        }
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
        if self.stage >= Stage::Unmasking || !self.gone.insert(i) {
            return;
        }
        self.reasons.entry(i).or_insert(reason);
        if self.pending.remove(&i) && self.pending.is_empty() {
            self.advance(now);
        }
    }

    /// The stage's deadline passed: whoever has not answered is out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stage < Stage::Unmasking && now >= self.deadline {
            self.leave_out_pending();
            self.advance(now);
        }
    }

    /// Whoever the stage still waits for is out (a timeout), and told so.
    fn leave_out_pending(&mut self) {
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
    }

    /// A SecAgg message from `from`. `Err`: a protocol violation (drop the sender).
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<Handled, Error> {
        let i = self.setup.index_of(from).ok_or_else(|| {
            sa(
                SecAggError::NotAParticipant,
                format!("{} is not a participant of round {}", from, self.round),
            )
        })?;
        let stage = stage_of(&msg).ok_or_else(|| {
            sa(
                SecAggError::OutOfOrder,
                format!("{} is not a client SecAgg message", msg.kind()),
            )
        })?;
        if self.gone.contains(&i) || stage < self.stage || self.stage >= Stage::Unmasking {
            return Ok(Handled::Late);
        }
        if stage > self.stage {
            return Err(sa(
                SecAggError::OutOfOrder,
                format!("{} during {:?}: out of order", msg.kind(), self.stage),
            ));
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
            _ => return Err(sa(SecAggError::OutOfOrder, "unexpected message")),
        }
        self.pending.remove(&i);
        if self.stage == Stage::MaskedInput && self.u3.len() >= self.collect_target {
            self.leave_out_pending();
        }
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
            return Err(sa(
                SecAggError::BadAdvertisement,
                format!("{from} advertised keys as {}", a.client),
            ));
        }
        if a.certificate.len() > MAX_CERTIFICATE_BYTES || a.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(sa(SecAggError::BadAdvertisement, "oversized advertisement"));
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
                SecAggError::BadShare,
                "shares must go to exactly the neighbours that advertised keys",
            ));
        }
        if shares
            .iter()
            .any(|s| s.ciphertext.len() != SEALED_SHARE_BYTES)
        {
            return Err(sa(SecAggError::BadShare, "sealed share of the wrong size"));
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
            return Err(sa(SecAggError::InvalidInput, "non-finite metric"));
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
            .ok_or_else(|| {
                sa(
                    SecAggError::BadSignature,
                    "signature from a client without keys",
                )
            })?;
        let names: Vec<&str> = self
            .u3
            .iter()
            .filter_map(|&u| self.setup.participants.get(u))
            .map(ClientId::as_str)
            .collect();
        sig::verify(cert, &sig::survivors_bytes(self.round, &names), &signature).map_err(|_| {
            sa(
                SecAggError::BadSignature,
                "survivor-list signature does not verify",
            )
        })?;
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
                            sa(
                                SecAggError::BadShare,
                                format!("share of {id}, not a neighbour that shared keys"),
                            )
                        })?;
                    if self.u3.contains(&v) != survivor || !seen.insert(v) {
                        return Err(sa(
                            SecAggError::BadShare,
                            format!("share of {id} of the wrong kind or repeated"),
                        ));
                    }
                    if share.x != point {
                        return Err(sa(
                            SecAggError::BadShare,
                            "revealed share for another point",
                        ));
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
        if self.stage == Stage::Unmasking {
            return;
        }
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
            Stage::Unmasking | Stage::Done => {}
        }
    }

    fn finish(&mut self) {
        match self.plan_unmask() {
            Ok(job) => {
                self.job = Some(job);
                self.stage = Stage::Unmasking;
                self.entered = Some(Stage::Unmasking);
            }
            Err(e) => self.abort(AbortReason::SecureAggregation(e.to_string())),
        }
    }

    /// Everything the unmask needs, moved or copied out of the round (cheap: shares and
    /// keys; the sum is moved).
    fn plan_unmask(&mut self) -> Result<UnmaskJob, Error> {
        let sum = std::mem::take(&mut self.sum);
        if sum.len() != self.expected_len {
            return Err(sa(SecAggError::TooManyDropouts, "no masked inputs"));
        }
        let name = |i: usize| {
            self.setup
                .id(i)
                .cloned()
                .unwrap_or_else(|_| ClientId::new("?"))
        };
        let survivors = self
            .u3
            .iter()
            .map(|&u| (name(u), self.b_shares.remove(&u).unwrap_or_default()))
            .collect();
        // Dropped clients: their mask keys are rebuilt, then the seeds they shared with each
        // survivor among their neighbours.
        let mut dropped = Vec::new();
        for v in self.dropped_to_recover() {
            let advert = self
                .adverts
                .get(&v)
                .ok_or_else(|| sa(SecAggError::Internal, "dropped client without keys"))?;
            let mut peers = Vec::new();
            for &u in self.neighbours(v) {
                if let (true, Some(peer)) = (self.u3.contains(&u), self.adverts.get(&u)) {
                    // u added +PRG if u < v: take it off with the opposite sign.
                    let sign = match pair_sign(u, v) {
                        Sign::Add => Sign::Sub,
                        Sign::Sub => Sign::Add,
                    };
                    peers.push((peer.s_pk, sign));
                }
            }
            dropped.push(DroppedKey {
                client: advert.client.clone(),
                shares: self.s_shares.remove(&v).unwrap_or_default(),
                s_pk: advert.s_pk,
                peers,
            });
        }
        self.stats.recovered_dropped = dropped.len();
        Ok(UnmaskJob {
            threshold: self.setup.threshold as usize,
            sum,
            survivors,
            dropped,
        })
    }
}

/// A dropped client whose pairwise masks must come off the sum.
#[derive(Debug)]
struct DroppedKey {
    client: ClientId,
    /// Shares of its mask key `s`.
    shares: Vec<Share>,
    /// Its advertised public mask key (the rebuilt secret must match it).
    s_pk: [u8; 32],
    /// The public mask keys of its surviving neighbours, with the sign that removes each mask.
    peers: Vec<([u8; 32], Sign)>,
}

/// The server's heavy step of a secure round: rebuild every survivor's self-mask seed and
/// every dropped client's mask key from the revealed shares, derive the dropped clients'
/// pairwise seeds, and remove all those masks from the sum, on all cores. Pure computation:
/// a driver runs it on a blocking thread, the test harness inline.
pub struct UnmaskJob {
    threshold: usize,
    sum: Vec<u32>,
    /// Survivors and the shares of their self-mask seeds `b`.
    survivors: Vec<(ClientId, Vec<Share>)>,
    dropped: Vec<DroppedKey>,
}

impl std::fmt::Debug for UnmaskJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnmaskJob")
            .field("len", &self.sum.len())
            .field("survivors", &self.survivors.len())
            .field("dropped", &self.dropped.len())
            .finish_non_exhaustive()
    }
}

impl UnmaskJob {
    /// Runs the job: the unmasked sum, or why it cannot be computed.
    pub fn run(self) -> Result<Vec<u32>, Error> {
        let t = self.threshold;
        let mut sum = self.sum;
        let mut masks: Vec<([u8; 32], Sign)> = Vec::with_capacity(self.survivors.len());
        for (client, shares) in &self.survivors {
            let b = shamir::recover(shares, t).map_err(|e| {
                sa(
                    SecAggError::TooManyDropouts,
                    format!("self mask of {client}: {e}"),
                )
            })?;
            masks.push((b, Sign::Sub));
        }
        let mut secrets = Vec::with_capacity(self.dropped.len());
        let mut pairs: Vec<(usize, [u8; 32], Sign)> = Vec::new();
        for d in &self.dropped {
            let secret = Zeroizing::new(shamir::recover(&d.shares, t).map_err(|e| {
                sa(
                    SecAggError::TooManyDropouts,
                    format!("mask key of {}: {e}", d.client),
                )
            })?);
            if KeyPair::from_secret(*secret).public() != d.s_pk {
                return Err(sa(
                    SecAggError::BadShare,
                    format!(
                        "reconstructed mask key of {} does not match its advertisement",
                        d.client
                    ),
                ));
            }
            for (pk, sign) in &d.peers {
                pairs.push((secrets.len(), *pk, *sign));
            }
            secrets.push(secret);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        masks.extend(derive_pair_seeds(&secrets, &pairs, threads)?);
        mask::apply_all(&masks, &mut sum, threads);
        for (seed, _) in &mut masks {
            zeroize::Zeroize::zeroize(seed);
        }
        Ok(sum)
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
                            let secret = secrets
                                .get(*v)
                                .ok_or_else(|| sa(SecAggError::Internal, "no such secret"))?;
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
                    .unwrap_or_else(|_| Err(sa(SecAggError::Internal, "a worker thread panicked")))
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
    let cap = crate::wire::codec::DEFAULT_MAX_CONTROL_BYTES as usize;
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
    match crate::wire::codec::encode(&msg) {
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
    use crate::wire::messages::Advertisement;

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
            crate::wire::codec::encode(&msg).is_ok(),
            "{n} adverts were accepted"
        );
    }
}
