//! The client's side of a SecAgg+ round: key advertisement, sharing, masking, unmasking.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_crypto::secagg::Entropy;
use flotilla_crypto::secagg::keys::{self, KeyPair};
use flotilla_crypto::secagg::mask::{self, Sign};
use flotilla_crypto::secagg::shamir::{self, Share};
use flotilla_crypto::secagg::sign::{self as sig};
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use super::{
    MASK_PURPOSE, SHARE_BYTES, SHARE_PURPOSE, SecAggIdentity, direction, encode_input, get_share,
    pair_sign, put_share, sa, share_aad,
};
use crate::provider::CryptoProvider;
use crate::wire::config::SecAggSetup;
use crate::wire::messages::{
    Advertisement, ClientId, EncryptedShare, MaskedInput, Message, TrainRes, UnmaskRequest,
};
use crate::wire::params::Params;
use crate::{Error, SecAggError};

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
    /// The mask job is out ([`ClientRound::take_job`]).
    Masking,
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
    job: Option<MaskJob>,
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
        provider: &CryptoProvider,
    ) -> Result<(Self, Message), Error> {
        setup.validate()?;
        let me = setup.index_of(me_id).ok_or_else(|| {
            sa(
                SecAggError::NotAParticipant,
                "this client is not among the round's participants",
            )
        })?;
        let neighbours: BTreeSet<usize> = setup
            .graph()
            .get(me)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut entropy = provider.secagg_entropy(round);
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
                rng: provider.rounding_rng(round)?,
                job: None,
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
            Err(sa(
                SecAggError::OutOfOrder,
                format!("{what} out of order (at {:?})", self.stage),
            ))
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
                    sa(
                        SecAggError::BadAdvertisement,
                        format!("advertisement of {} who is not a neighbour", a.client),
                    )
                })?;
            if a.round != self.round || self.peers.contains_key(&v) {
                return Err(sa(
                    SecAggError::BadAdvertisement,
                    format!("stale or repeated advertisement of {}", a.client),
                ));
            }
            let named = identity.verifier.verify(&a.certificate)?;
            if named != a.client.as_str() {
                return Err(sa(
                    SecAggError::BadAdvertisement,
                    format!(
                        "advertisement of {} carries the certificate of {named}",
                        a.client
                    ),
                ));
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
                sa(
                    SecAggError::BadSignature,
                    format!(
                        "advertisement of {} does not verify: forged, or it was sent another model",
                        a.client
                    ),
                )
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
            return Err(SecAggError::BelowThreshold {
                step: "advertised keys",
                have: self.peers.len(),
                need: self.threshold(),
            }
            .into());
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
                .ok_or_else(|| {
                    sa(
                        SecAggError::BadShare,
                        format!("share from {} who did not advertise to us", e.peer),
                    )
                })?;
            if self.held.contains_key(&u) {
                return Err(sa(
                    SecAggError::BadShare,
                    format!("two shares from {}", e.peer),
                ));
            }
            let peer = self
                .peers
                .get(&u)
                .ok_or_else(|| sa(SecAggError::Internal, "unknown peer"))?;
            let key = self.c.agree(&peer.c_pk, SHARE_PURPOSE)?;
            let plain = keys::open(
                &key,
                direction(u, self.me),
                &share_aad(self.round, &e.peer, &me_id),
                &e.ciphertext,
            )
            .map_err(|_| {
                sa(
                    SecAggError::BadShare,
                    format!("share from {} does not open", e.peer),
                )
            })?;
            let ss = get_share(plain.get(..SHARE_BYTES).unwrap_or(&[]))?;
            let bs = get_share(plain.get(SHARE_BYTES..).unwrap_or(&[]))?;
            let point = self.me as u32 + 1;
            if ss.x != point || bs.x != point || plain.len() != 2 * SHARE_BYTES {
                return Err(sa(
                    SecAggError::BadShare,
                    format!("share from {} is for another point", e.peer),
                ));
            }
            self.held.insert(u, (ss, bs));
        }
        if self.held.len() < self.threshold() {
            return Err(SecAggError::BelowThreshold {
                step: "shared keys",
                have: self.held.len(),
                need: self.threshold(),
            }
            .into());
        }
        self.stage = ClientStage::SharesReceived;
        self.try_mask()
    }

    /// Phase 2: the local training result. Returns the masked input once the shares are in.
    pub fn on_result(&mut self, result: TrainRes) -> Result<Option<Message>, Error> {
        if self.result.is_some() || result.round != self.round {
            return Err(sa(SecAggError::OutOfOrder, "unexpected training result"));
        }
        self.result = Some(result);
        self.try_mask()
    }

    /// Once both the training result and the neighbours' shares are in: prepares the mask job
    /// (the pairwise seeds are agreed here, cheaply; quantizing and masking the whole vector
    /// is the job). The masked input is sent after [`ClientRound::handle_mask_result`].
    fn try_mask(&mut self) -> Result<Option<Message>, Error> {
        if self.stage != ClientStage::SharesReceived {
            return Ok(None);
        }
        let Some(result) = self.result.take() else {
            return Ok(None);
        };
        // Seeds are secrets: wiped when `masks` goes, whichever way this returns.
        let mut masks = MaskSeeds(Vec::with_capacity(self.held.len() + 1));
        masks.0.push((*self.b, Sign::Add));
        for v in self.held.keys() {
            let peer = self
                .peers
                .get(v)
                .ok_or_else(|| sa(SecAggError::Internal, "unknown peer"))?;
            let seed = self.s.agree(&peer.s_pk, MASK_PURPOSE)?;
            masks.0.push((*seed, pair_sign(self.me, *v)));
        }
        self.job = Some(MaskJob {
            setup: self.setup.clone(),
            model: self.model.clone(),
            result,
            rng: self.rng.clone(),
            masks,
        });
        self.stage = ClientStage::Masking;
        Ok(None)
    }

    /// The mask work, once ready: encoding the update and adding every mask to it (tens of
    /// milliseconds for a CNN) runs off the client's event loop. Its result goes to
    /// [`ClientRound::handle_mask_result`].
    pub fn take_job(&mut self) -> Option<MaskJob> {
        self.job.take()
    }

    /// The masked input computed by the job from [`ClientRound::take_job`]: the message to
    /// send, or why the round must be aborted.
    pub fn handle_mask_result(
        &mut self,
        result: Result<MaskedInput, Error>,
    ) -> Result<Option<Message>, Error> {
        if self.stage != ClientStage::Masking {
            return Ok(None);
        }
        let masked = result?;
        if masked.round != self.round {
            return Err(sa(SecAggError::OutOfOrder, "mask job of another round"));
        }
        self.stage = ClientStage::MaskedSent;
        Ok(Some(Message::MaskedInput(masked)))
    }

    /// Phase 3a: checks and signs the survivor list.
    pub fn on_survivors(
        &mut self,
        survivors: Vec<ClientId>,
        identity: &SecAggIdentity,
    ) -> Result<Message, Error> {
        self.expect(ClientStage::MaskedSent, "survivor list")?;
        if survivors.windows(2).any(|w| w[0] >= w[1]) {
            return Err(sa(
                SecAggError::BadSurvivors,
                "survivor list not sorted and distinct",
            ));
        }
        let mut live_neighbours = 0;
        let mut includes_me = false;
        for id in &survivors {
            let i = self.setup.index_of(id).ok_or_else(|| {
                sa(
                    SecAggError::BadSurvivors,
                    format!("survivor {id} is not a participant"),
                )
            })?;
            includes_me |= i == self.me;
            if self.neighbours.contains(&i) {
                live_neighbours += 1;
            }
        }
        if !includes_me {
            return Err(sa(SecAggError::BadSurvivors, "survivor list without us"));
        }
        if live_neighbours < self.threshold() {
            return Err(SecAggError::BelowThreshold {
                step: "survived",
                have: live_neighbours,
                need: self.threshold(),
            }
            .into());
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
            return Err(sa(
                SecAggError::OutOfOrder,
                "a second unmask request in one round: refused",
            ));
        }
        self.expect(ClientStage::Signed, "unmask request")?;
        let signed = self
            .signed
            .as_ref()
            .ok_or_else(|| sa(SecAggError::OutOfOrder, "nothing signed"))?;
        if &req.survivors != signed {
            return Err(sa(
                SecAggError::BadSurvivors,
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
            let v = self.setup.index_of(id).ok_or_else(|| {
                sa(
                    SecAggError::BadSurvivors,
                    format!("dropped {id} is not a participant"),
                )
            })?;
            if survivors.contains(&v) {
                return Err(sa(
                    SecAggError::BadSurvivors,
                    format!("asked for both shares of {id} (as survivor and as dropped): refused"),
                ));
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
                .ok_or_else(|| {
                    sa(
                        SecAggError::BadSignature,
                        format!("signature of {id}, who is not a survivor"),
                    )
                })?;
            let peer = self.peers.get(&v).ok_or_else(|| {
                sa(
                    SecAggError::BadSignature,
                    format!("signature of {id}, who is not a neighbour"),
                )
            })?;
            sig::verify(&peer.certificate, &msg, signature).map_err(|_| {
                sa(
                    SecAggError::BadSignature,
                    format!("survivor-list signature of {id} does not verify"),
                )
            })?;
            vouched.insert(v);
        }
        if vouched.len() < self.threshold() {
            return Err(SecAggError::BelowThreshold {
                step: "vouched for the survivor list",
                have: vouched.len(),
                need: self.threshold(),
            }
            .into());
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

/// Mask seeds with their signs, wiped on drop.
struct MaskSeeds(Vec<([u8; 32], Sign)>);

impl Drop for MaskSeeds {
    fn drop(&mut self) {
        for (seed, _) in &mut self.0 {
            zeroize::Zeroize::zeroize(seed);
        }
    }
}

/// A client's heavy step of a secure round: encode its update (clip, scale, stochastic
/// rounding) and add its self mask and every pairwise mask, in one pass over the vector.
/// Pure computation: a driver runs it on a blocking thread, the test harness inline.
pub struct MaskJob {
    setup: SecAggSetup,
    model: Params,
    result: TrainRes,
    rng: ChaCha20Rng,
    masks: MaskSeeds,
}

impl std::fmt::Debug for MaskJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskJob")
            .field("round", &self.result.round)
            .field("len", &self.model.len())
            .field("masks", &self.masks.0.len())
            .finish_non_exhaustive()
    }
}

impl MaskJob {
    /// Runs the job: the masked input to send.
    pub fn run(mut self) -> Result<MaskedInput, Error> {
        let mut values = encode_input(&self.setup, &self.model, &self.result, &mut self.rng)?;
        // One thread: a simulation runs many clients at once, and a device has just trained.
        mask::apply_all(&self.masks.0, &mut values, 1);
        Ok(MaskedInput {
            round: self.result.round,
            metrics: std::mem::take(&mut self.result.metrics),
            values,
        })
    }
}
