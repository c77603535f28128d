//! The wire format.
//!
//! Every message travels on its own QUIC stream as:
//!
//! ```text
//! +-------+---------+-------+-------------+----------------------+-------------------------+
//! | "FL"  | version | flags | body_len u32| control body         | payload (optional)      |
//! | 2 B   | 1 B     | 1 B   | LE, 4 B     | postcard, ≤ max      | raw LE f32, length from |
//! |       |         |       |             |                      | the manifest in the body|
//! +-------+---------+-------+-------------+----------------------+-------------------------+
//! ```
//!
//! * The control body is a compact serde encoding ([postcard]) of [`Control`], capped at
//!   [`Limits::max_control_bytes`] (1 MiB by default) so that a peer cannot make the other
//!   side allocate before it is known to be sane.
//! * Tensor values are never put through the serializer. A message that carries a model puts
//!   the [`Manifest`] in its control body; the values follow as raw little-endian `f32` bytes.
//!   The receiver learns the payload length from the manifest, checks it against
//!   [`Limits::max_payload_bytes`] (and, where it knows one, the expected manifest) and only
//!   then allocates, once, exactly. There is no fixed ceiling: a 2 GiB model is fine.
//! * Decoding is incremental ([`FrameHeader::parse`], [`decode_control`],
//!   [`PayloadAssembler::push`]) so that a driver can feed stream chunks as they arrive, and
//!   every decoder returns a typed [`Error`] on any input; none panics.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::wire::Error;
use crate::wire::config::SecAggSetup;
use crate::wire::messages::{
    AbortReason, Advertisement, ClientId, EncryptedShare, EvaluateIns, EvaluateRes, Hello,
    MaskedInput, Message, Metrics, TrainConfig, TrainIns, TrainRes, UnmaskRequest, Welcome,
};
use crate::wire::params::{Manifest, Params};
use flotilla_crypto::secagg::shamir::Share;

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"FL";
/// Frame format version written by this build.
pub const WIRE_VERSION: u8 = 3;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Default cap on a control body.
pub const DEFAULT_MAX_CONTROL_BYTES: u32 = 1 << 20;
/// Default cap on a tensor payload (16 GiB: far above any model we expect, below what would
/// exhaust a server by accident). Configurable.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 16 << 30;
/// Chunk size used when streaming tensor payloads.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// Size limits a receiver enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest control body accepted.
    pub max_control_bytes: u32,
    /// Largest tensor payload accepted.
    pub max_payload_bytes: u64,
    /// Most metrics in one result.
    pub max_metrics: u32,
    /// Longest metric name, in bytes.
    pub max_name_bytes: u32,
    /// Longest free-text field (reasons, capability strings), in bytes.
    pub max_text_bytes: u32,
    /// Longest opaque blob (a certificate in a key advertisement, a sealed share), in bytes.
    pub max_blob_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_bytes: DEFAULT_MAX_CONTROL_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_metrics: crate::wire::bounds::DEFAULT_MAX_METRICS,
            max_name_bytes: crate::wire::bounds::DEFAULT_MAX_NAME_BYTES,
            max_text_bytes: crate::wire::bounds::DEFAULT_MAX_TEXT_BYTES,
            max_blob_bytes: crate::wire::bounds::DEFAULT_MAX_BLOB_BYTES,
        }
    }
}

/// The control part of a message as it is serialized. Variant order is the wire tag: append
/// new variants at the end, never reorder (the golden-file tests enforce this).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// See [`Message::Hello`].
    Hello(Hello),
    /// See [`Message::Welcome`].
    Welcome(Welcome),
    /// See [`Message::GetParams`].
    GetParams,
    /// See [`Message::InitialParams`]; values follow.
    InitialParams {
        /// Model manifest.
        manifest: Manifest,
    },
    /// See [`Message::Train`]; values follow.
    Train {
        /// Round.
        round: u64,
        /// Local training configuration.
        config: TrainConfig,
        /// Deadline from receipt, ms.
        deadline_ms: u64,
        /// Model manifest.
        manifest: Manifest,
        /// Secure-aggregation parameters, if the round is secure.
        secagg: Option<SecAggSetup>,
    },
    /// See [`Message::TrainResult`]; values follow.
    TrainResult {
        /// Round.
        round: u64,
        /// Examples trained on.
        num_examples: u64,
        /// Metrics.
        metrics: Metrics,
        /// Model manifest.
        manifest: Manifest,
    },
    /// See [`Message::Evaluate`]; values follow.
    Evaluate {
        /// Round.
        round: u64,
        /// Deadline from receipt, ms.
        deadline_ms: u64,
        /// Model manifest.
        manifest: Manifest,
    },
    /// See [`Message::EvaluateResult`].
    EvaluateResult(EvaluateRes),
    /// See [`Message::Abort`].
    Abort {
        /// Round, or `None` for the session.
        round: Option<u64>,
        /// Why.
        reason: AbortReason,
    },
    /// See [`Message::Heartbeat`].
    Heartbeat {
        /// Counter.
        seq: u64,
    },
    /// See [`Message::AdvertiseKeys`].
    AdvertiseKeys(Advertisement),
    /// See [`Message::NeighbourKeys`].
    NeighbourKeys {
        /// Round.
        round: u64,
        /// Advertisements.
        adverts: Vec<Advertisement>,
    },
    /// See [`Message::ShareKeys`].
    ShareKeys {
        /// Round.
        round: u64,
        /// Sealed shares.
        shares: Vec<EncryptedShare>,
    },
    /// See [`Message::ForwardShares`].
    ForwardShares {
        /// Round.
        round: u64,
        /// Sealed shares.
        shares: Vec<EncryptedShare>,
    },
    /// See [`Message::MaskedInput`]; `len` little-endian `u32` words follow.
    MaskedInput {
        /// Round.
        round: u64,
        /// Metrics.
        metrics: Metrics,
        /// Number of words in the payload.
        len: u64,
    },
    /// See [`Message::Survivors`].
    Survivors {
        /// Round.
        round: u64,
        /// Survivors.
        survivors: Vec<ClientId>,
    },
    /// See [`Message::SurvivorsSigned`].
    SurvivorsSigned {
        /// Round.
        round: u64,
        /// Signature.
        signature: Vec<u8>,
    },
    /// See [`Message::Unmask`].
    Unmask(UnmaskRequest),
    /// See [`Message::UnmaskShares`].
    UnmaskShares {
        /// Round.
        round: u64,
        /// Self-mask seed shares.
        self_mask: Vec<(ClientId, Share)>,
        /// Mask-key shares.
        keys: Vec<(ClientId, Share)>,
    },
}

impl Control {
    /// Manifest of the payload that follows this control body, if any.
    pub fn payload_manifest(&self) -> Option<&Manifest> {
        match self {
            Control::InitialParams { manifest }
            | Control::Train { manifest, .. }
            | Control::TrainResult { manifest, .. }
            | Control::Evaluate { manifest, .. } => Some(manifest),
            _ => None,
        }
    }

    /// Number of 4-byte words that follow this control body (validating any manifest), or
    /// `None` if it carries no payload.
    pub fn payload_words(&self) -> Result<Option<u64>, Error> {
        match self {
            Control::MaskedInput { len, .. } => Ok(Some(*len)),
            other => other.payload_manifest().map(Manifest::validate).transpose(),
        }
    }
}

/// The fixed header in front of every control body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the control body that follows.
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and checks a frame header.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Self, Error> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::Truncated {
                what: "frame header",
                needed: HEADER_LEN as u64,
                got: bytes.len() as u64,
            })?;
        let [m0, m1, version, flags, l0, l1, l2, l3] = *h;
        if [m0, m1] != MAGIC {
            return Err(Error::BadMagic([m0, m1]));
        }
        if version != WIRE_VERSION {
            return Err(Error::UnsupportedVersion {
                got: version,
                supported: WIRE_VERSION,
            });
        }
        if flags != 0 {
            return Err(Error::Malformed(format!(
                "unknown frame flags {flags:#04x}"
            )));
        }
        let body_len = u32::from_le_bytes([l0, l1, l2, l3]);
        if body_len > limits.max_control_bytes {
            return Err(Error::FrameTooLarge {
                len: body_len as u64,
                max: limits.max_control_bytes as u64,
            });
        }
        Ok(Self { body_len })
    }
}

/// Little-endian bytes of an `f32` slice; borrowed (no copy) on little-endian machines.
pub fn f32_le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        Cow::Borrowed(bytemuck::cast_slice(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A message ready to be written: the header and control body, then the payload values.
#[derive(Debug)]
pub struct Encoded<'a> {
    /// Frame header plus control body.
    pub head: Vec<u8>,
    /// Tensor values that follow, if any.
    pub payload: Option<&'a [f32]>,
}

impl Encoded<'_> {
    /// Payload as little-endian byte chunks of at most `chunk_bytes` (rounded to whole values).
    pub fn payload_chunks(&self, chunk_bytes: usize) -> impl Iterator<Item = Cow<'_, [u8]>> {
        let per = (chunk_bytes / 4).max(1);
        self.payload.unwrap_or(&[]).chunks(per).map(f32_le_bytes)
    }

    /// Total length on the wire.
    pub fn wire_len(&self) -> u64 {
        self.head.len() as u64 + self.payload.map_or(0, |p| p.len() as u64 * 4)
    }

    /// The whole message as one buffer (tests, in-memory transports).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len() as usize);
        out.extend_from_slice(&self.head);
        if let Some(p) = self.payload {
            out.extend_from_slice(&f32_le_bytes(p));
        }
        out
    }
}

/// The one mapping from a [`Message`] to its wire form: a control body and the 4-byte words
/// that follow it. The match is exhaustive on purpose: a new message kind does not compile
/// until it is given an encoding here (and a decoding in `complete_without_payload` or
/// [`PayloadAssembler::finish`]).
fn to_control(msg: &Message) -> (Control, Option<&[f32]>) {
    let model = |p: &Params| (**p.manifest()).clone();
    match msg {
        Message::Hello(h) => (Control::Hello(h.clone()), None),
        Message::Welcome(w) => (Control::Welcome(w.clone()), None),
        Message::GetParams => (Control::GetParams, None),
        Message::InitialParams(p) => (
            Control::InitialParams { manifest: model(p) },
            Some(p.values()),
        ),
        Message::Train(t) => (
            Control::Train {
                round: t.round,
                config: t.config.clone(),
                deadline_ms: t.deadline_ms,
                manifest: model(&t.model),
                secagg: t.secagg.clone(),
            },
            Some(t.model.values()),
        ),
        Message::TrainResult(r) => (
            Control::TrainResult {
                round: r.round,
                num_examples: r.num_examples,
                metrics: r.metrics.clone(),
                manifest: model(&r.params),
            },
            Some(r.params.values()),
        ),
        Message::Evaluate(e) => (
            Control::Evaluate {
                round: e.round,
                deadline_ms: e.deadline_ms,
                manifest: model(&e.model),
            },
            Some(e.model.values()),
        ),
        Message::EvaluateResult(r) => (Control::EvaluateResult(r.clone()), None),
        Message::Abort { round, reason } => (
            Control::Abort {
                round: *round,
                // Cut to the default bound so that a receiver never refuses our reasons.
                reason: reason.truncated(crate::wire::bounds::DEFAULT_MAX_TEXT_BYTES as usize),
            },
            None,
        ),
        Message::Heartbeat { seq } => (Control::Heartbeat { seq: *seq }, None),
        Message::AdvertiseKeys(a) => (Control::AdvertiseKeys(a.clone()), None),
        Message::NeighbourKeys { round, adverts } => (
            Control::NeighbourKeys {
                round: *round,
                adverts: adverts.clone(),
            },
            None,
        ),
        Message::ShareKeys { round, shares } => (
            Control::ShareKeys {
                round: *round,
                shares: shares.clone(),
            },
            None,
        ),
        Message::ForwardShares { round, shares } => (
            Control::ForwardShares {
                round: *round,
                shares: shares.clone(),
            },
            None,
        ),
        // The masked words travel as raw little-endian 4-byte words like tensor values; they
        // are reinterpreted, never converted, so every bit survives.
        Message::MaskedInput(m) => (
            Control::MaskedInput {
                round: m.round,
                metrics: m.metrics.clone(),
                len: m.values.len() as u64,
            },
            Some(bytemuck::cast_slice(&m.values)),
        ),
        Message::Survivors { round, survivors } => (
            Control::Survivors {
                round: *round,
                survivors: survivors.clone(),
            },
            None,
        ),
        Message::SurvivorsSigned { round, signature } => (
            Control::SurvivorsSigned {
                round: *round,
                signature: signature.clone(),
            },
            None,
        ),
        Message::Unmask(u) => (Control::Unmask(u.clone()), None),
        Message::UnmaskShares {
            round,
            self_mask,
            keys,
        } => (
            Control::UnmaskShares {
                round: *round,
                self_mask: self_mask.clone(),
                keys: keys.clone(),
            },
            None,
        ),
    }
}

/// Encodes a message. Fails only if the control body would exceed the default cap.
pub fn encode(msg: &Message) -> Result<Encoded<'_>, Error> {
    let (control, params) = to_control(msg);
    let mut head = vec![MAGIC[0], MAGIC[1], WIRE_VERSION, 0, 0, 0, 0, 0];
    let head = postcard::to_extend(&control, std::mem::take(&mut head))
        .map_err(|e| Error::Malformed(format!("encoding control body: {e}")))?;
    let body_len = head.len() - HEADER_LEN;
    if body_len > DEFAULT_MAX_CONTROL_BYTES as usize {
        return Err(Error::FrameTooLarge {
            len: body_len as u64,
            max: DEFAULT_MAX_CONTROL_BYTES as u64,
        });
    }
    let mut head = head;
    if let Some(len) = head.get_mut(4..8) {
        len.copy_from_slice(&(body_len as u32).to_le_bytes());
    }
    Ok(Encoded {
        head,
        payload: params,
    })
}

/// Encodes a message into one buffer.
pub fn encode_to_vec(msg: &Message) -> Result<Vec<u8>, Error> {
    Ok(encode(msg)?.to_vec())
}

/// A decoded control body, possibly still waiting for its payload.
#[derive(Debug)]
pub enum Decoded {
    /// The message is complete.
    Complete(Message),
    /// The message carries a model; feed the payload to the assembler.
    NeedsPayload(PendingPayload),
}

/// A control body whose payload has not been read yet. Inspect [`PendingPayload::manifest`]
/// and [`PendingPayload::payload_len`] before calling [`PendingPayload::start`], which
/// allocates.
#[derive(Debug)]
pub struct PendingPayload {
    control: Control,
    numel: u64,
}

impl PendingPayload {
    /// Errors unless the payload is what a receiver expecting models of `manifest` accepts:
    /// a model with exactly that manifest, or a masked input of one word per parameter plus
    /// the weight. Call before [`PendingPayload::start`].
    pub fn check_expected(&self, manifest: &Manifest) -> Result<(), Error> {
        match &self.control {
            Control::MaskedInput { len, .. } => {
                let want = manifest.numel() + 1;
                if *len != want {
                    return Err(Error::PayloadLengthMismatch {
                        expected: want * 4,
                        got: len.saturating_mul(4),
                    });
                }
                Ok(())
            }
            _ if self.manifest() != manifest => Err(Error::ManifestMismatch),
            _ => Ok(()),
        }
    }

    /// Manifest of the incoming model (empty for a masked input).
    pub fn manifest(&self) -> &Manifest {
        // Constructed only for controls that carry a manifest.
        static EMPTY: Manifest = Manifest {
            tensors: Vec::new(),
        };
        self.control.payload_manifest().unwrap_or(&EMPTY)
    }

    /// Bytes of payload expected.
    pub fn payload_len(&self) -> u64 {
        self.numel * 4
    }

    /// The control body.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Allocates exactly the payload's size and returns the assembler to feed.
    pub fn start(self) -> Result<PayloadAssembler, Error> {
        let n = usize::try_from(self.numel).map_err(|_| {
            Error::Malformed("payload does not fit in memory on this platform".into())
        })?;
        let mut values = Vec::new();
        values.try_reserve_exact(n).map_err(|_| {
            Error::Malformed(format!(
                "cannot allocate {} bytes for payload",
                self.numel * 4
            ))
        })?;
        Ok(PayloadAssembler {
            control: self.control,
            numel: n,
            values,
            partial: [0; 4],
            partial_len: 0,
        })
    }
}

/// Decodes a control body (the bytes after the header) and validates any manifest in it.
pub fn decode_control(body: &[u8], limits: &Limits) -> Result<Decoded, Error> {
    if body.len() > limits.max_control_bytes as usize {
        return Err(Error::FrameTooLarge {
            len: body.len() as u64,
            max: limits.max_control_bytes as u64,
        });
    }
    let (control, rest): (Control, &[u8]) = postcard::take_from_bytes(body)
        .map_err(|e| Error::Malformed(format!("control body: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes(rest.len() as u64));
    }
    crate::wire::bounds::check_control(&control, limits)?;
    let numel = match control.payload_words()? {
        None => return complete_without_payload(control).map(Decoded::Complete),
        Some(n) => n,
    };
    let bytes = numel.saturating_mul(4);
    if bytes > limits.max_payload_bytes {
        return Err(Error::PayloadTooLarge {
            len: bytes,
            max: limits.max_payload_bytes,
        });
    }
    Ok(Decoded::NeedsPayload(PendingPayload { control, numel }))
}

fn complete_without_payload(control: Control) -> Result<Message, Error> {
    Ok(match control {
        Control::Hello(h) => Message::Hello(h),
        Control::Welcome(w) => Message::Welcome(w),
        Control::GetParams => Message::GetParams,
        Control::EvaluateResult(r) => Message::EvaluateResult(r),
        Control::Abort { round, reason } => Message::Abort { round, reason },
        Control::Heartbeat { seq } => Message::Heartbeat { seq },
        Control::AdvertiseKeys(a) => Message::AdvertiseKeys(a),
        Control::NeighbourKeys { round, adverts } => Message::NeighbourKeys { round, adverts },
        Control::ShareKeys { round, shares } => Message::ShareKeys { round, shares },
        Control::ForwardShares { round, shares } => Message::ForwardShares { round, shares },
        Control::Survivors { round, survivors } => Message::Survivors { round, survivors },
        Control::SurvivorsSigned { round, signature } => {
            Message::SurvivorsSigned { round, signature }
        }
        Control::Unmask(u) => Message::Unmask(u),
        Control::UnmaskShares {
            round,
            self_mask,
            keys,
        } => Message::UnmaskShares {
            round,
            self_mask,
            keys,
        },
        Control::InitialParams { .. }
        | Control::Train { .. }
        | Control::TrainResult { .. }
        | Control::Evaluate { .. }
        | Control::MaskedInput { .. } => {
            return Err(Error::Malformed("model message without payload".into()));
        }
    })
}

/// Collects a tensor payload chunk by chunk into a buffer allocated once.
#[derive(Debug)]
pub struct PayloadAssembler {
    control: Control,
    numel: usize,
    values: Vec<f32>,
    partial: [u8; 4],
    partial_len: usize,
}

impl PayloadAssembler {
    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        (self.numel - self.values.len()) as u64 * 4 - self.partial_len as u64
    }

    /// Feeds the next chunk. Errors if it runs past the expected length.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), Error> {
        if chunk.len() as u64 > self.remaining() {
            return Err(Error::PayloadLengthMismatch {
                expected: self.numel as u64 * 4,
                got: (self.values.len() as u64 * 4 + self.partial_len as u64)
                    .saturating_add(chunk.len() as u64),
            });
        }
        if self.partial_len > 0 {
            let take = (4 - self.partial_len).min(chunk.len());
            let (head, tail) = chunk.split_at(take);
            if let Some(dst) = self
                .partial
                .get_mut(self.partial_len..self.partial_len + take)
            {
                dst.copy_from_slice(head);
            }
            self.partial_len += take;
            chunk = tail;
            if self.partial_len == 4 {
                self.values.push(f32::from_le_bytes(self.partial));
                self.partial_len = 0;
            }
        }
        let whole = chunk.chunks_exact(4);
        let rest = whole.remainder();
        self.values
            .extend(whole.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        if !rest.is_empty() {
            if let Some(dst) = self.partial.get_mut(..rest.len()) {
                dst.copy_from_slice(rest);
            }
            self.partial_len = rest.len();
        }
        Ok(())
    }

    /// Finishes the message; errors if the payload is short.
    pub fn finish(self) -> Result<Message, Error> {
        if self.values.len() != self.numel || self.partial_len != 0 {
            return Err(Error::Truncated {
                what: "tensor payload",
                needed: self.numel as u64 * 4,
                got: self.values.len() as u64 * 4 + self.partial_len as u64,
            });
        }
        let values = self.values;
        if let Control::MaskedInput { round, metrics, .. } = self.control {
            return Ok(Message::MaskedInput(MaskedInput {
                round,
                metrics,
                values: bytemuck::cast_vec(values),
            }));
        }
        let params = |m: Manifest| Params::new(m, values);
        Ok(match self.control {
            Control::InitialParams { manifest } => Message::InitialParams(params(manifest)?),
            Control::Train {
                round,
                config,
                deadline_ms,
                manifest,
                secagg,
            } => Message::Train(TrainIns {
                round,
                config,
                deadline_ms,
                model: params(manifest)?,
                secagg,
            }),

            Control::TrainResult {
                round,
                num_examples,
                metrics,
                manifest,
            } => Message::TrainResult(TrainRes {
                round,
                num_examples,
                metrics,
                params: params(manifest)?,
            }),
            Control::Evaluate {
                round,
                deadline_ms,
                manifest,
            } => Message::Evaluate(EvaluateIns {
                round,
                deadline_ms,
                model: params(manifest)?,
            }),
            other => complete_without_payload(other)?,
        })
    }
}

/// Decodes one whole message from a buffer holding exactly one stream's bytes.
pub fn decode_from_slice(bytes: &[u8], limits: &Limits) -> Result<Message, Error> {
    let header = FrameHeader::parse(bytes, limits)?;
    let body_end = HEADER_LEN + header.body_len as usize;
    let body = bytes.get(HEADER_LEN..body_end).ok_or(Error::Truncated {
        what: "control body",
        needed: header.body_len as u64,
        got: bytes.len().saturating_sub(HEADER_LEN) as u64,
    })?;
    let rest = bytes.get(body_end..).unwrap_or(&[]);
    match decode_control(body, limits)? {
        Decoded::Complete(m) => {
            if rest.is_empty() {
                Ok(m)
            } else {
                Err(Error::TrailingBytes(rest.len() as u64))
            }
        }
        Decoded::NeedsPayload(p) => {
            // Check the length against the manifest before allocating.
            if rest.len() as u64 != p.payload_len() {
                return Err(Error::PayloadLengthMismatch {
                    expected: p.payload_len(),
                    got: rest.len() as u64,
                });
            }
            let mut a = p.start()?;
            a.push(rest)?;
            a.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::messages::*;
    use crate::wire::params::TensorSpec;

    fn params() -> Params {
        Params::new(
            Manifest::new(vec![
                TensorSpec::new("w", &[2, 2]),
                TensorSpec::new("b", &[2]),
            ]),
            vec![1.0, -2.0, 0.5, 3.25, f32::MIN_POSITIVE, -0.0],
        )
        .unwrap()
    }

    fn all_messages() -> Vec<Message> {
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), 0.25);
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                capabilities: Capabilities {
                    backend: "cpu".into(),
                    num_examples: Some(600),
                    secure_aggregation: true,
                    software: "flotilla 0.1.0".into(),
                    model: Some(ModelSummary {
                        digest: [7; 32],
                        tensors: 8,
                        parameters: 1_663_370,
                    }),
                },
            }),
            Message::Welcome(Welcome {
                client_id: ClientId::new("client-7"),
                heartbeat_ms: 5000,
            }),
            Message::GetParams,
            Message::InitialParams(params()),
            Message::Train(TrainIns {
                round: 3,
                config: TrainConfig {
                    optimizer: Optimizer::Adam {
                        beta1: 0.9,
                        beta2: 0.999,
                        epsilon: 1e-8,
                    },
                    batch_size: BatchSize::Full,
                    dp: Some(crate::wire::config::ClientDp {
                        clip: 1.0,
                        noise_std: 0.25,
                    }),
                    ..TrainConfig::default()
                },
                deadline_ms: 60_000,
                model: params(),
                secagg: Some(crate::wire::config::SecAggSetup {
                    participants: vec![ClientId::new("a"), ClientId::new("b"), ClientId::new("c")],
                    neighbours: 2,
                    threshold: 2,
                    clip: 0.5,
                    bits: 20,
                    max_weight: 1000,
                    graph_seed: 9,
                }),
            }),
            Message::TrainResult(TrainRes {
                round: 3,
                num_examples: 600,
                metrics: metrics.clone(),
                params: params(),
            }),
            Message::Evaluate(EvaluateIns {
                round: 3,
                deadline_ms: 10_000,
                model: params(),
            }),
            Message::EvaluateResult(EvaluateRes {
                round: 3,
                num_examples: 100,
                loss: 0.1,
                metrics,
            }),
            Message::Abort {
                round: Some(3),
                reason: AbortReason::TooFewClients {
                    available: 1,
                    required: 2,
                },
            },
            Message::Heartbeat { seq: 42 },
            Message::AdvertiseKeys(advert()),
            Message::NeighbourKeys {
                round: 3,
                adverts: vec![advert(), advert()],
            },
            Message::ShareKeys {
                round: 3,
                shares: vec![EncryptedShare {
                    peer: ClientId::new("b"),
                    ciphertext: vec![7; 104],
                }],
            },
            Message::ForwardShares {
                round: 3,
                shares: vec![EncryptedShare {
                    peer: ClientId::new("c"),
                    ciphertext: vec![8; 104],
                }],
            },
            Message::MaskedInput(MaskedInput {
                round: 3,
                metrics: Metrics::new(),
                // Words that are NaN or signalling-NaN patterns as f32 must survive intact.
                values: vec![0, 1, 0x7fc0_0001, 0x7f80_0001, 0xffff_ffff, 0x8000_0000],
            }),
            Message::Survivors {
                round: 3,
                survivors: vec![ClientId::new("a"), ClientId::new("b")],
            },
            Message::SurvivorsSigned {
                round: 3,
                signature: vec![1, 2, 3],
            },
            Message::Unmask(UnmaskRequest {
                round: 3,
                survivors: vec![ClientId::new("a"), ClientId::new("b")],
                dropped: vec![ClientId::new("c")],
                signatures: vec![(ClientId::new("b"), vec![4, 5])],
            }),
            Message::UnmaskShares {
                round: 3,
                self_mask: vec![(
                    ClientId::new("b"),
                    Share {
                        x: 1,
                        y: [1, 2, 3, 4, 5],
                    },
                )],
                keys: vec![(
                    ClientId::new("c"),
                    Share {
                        x: 1,
                        y: [6, 7, 8, 9, 10],
                    },
                )],
            },
        ]
    }

    fn advert() -> Advertisement {
        Advertisement {
            round: 3,
            client: ClientId::new("a"),
            c_pk: [1; 32],
            s_pk: [2; 32],
            certificate: vec![3; 10],
            signature: vec![4; 8],
        }
    }

    #[test]
    fn round_trip_every_variant() {
        for m in all_messages() {
            let bytes = encode_to_vec(&m).unwrap();
            let back = decode_from_slice(&bytes, &Limits::default()).unwrap();
            assert_eq!(back, m, "{}", m.kind());
        }
    }

    /// The encoding of every variant is pinned by a file in `tests/golden/`. A change to the
    /// wire format fails here; if it is intended, bump `WIRE_VERSION` or append variants, then
    /// regenerate with `FLOTILLA_BLESS=1 cargo test -p flotilla-protocol golden`.
    #[test]
    fn golden_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let bless = std::env::var_os("FLOTILLA_BLESS").is_some();
        for (i, m) in all_messages().iter().enumerate() {
            let path = dir.join(format!("{i:02}-{}.bin", m.kind()));
            let bytes = encode_to_vec(m).unwrap();
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let golden = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (bless with FLOTILLA_BLESS=1)", path.display())
            });
            assert_eq!(bytes, golden, "encoding of {} changed", m.kind());
            assert_eq!(&decode_from_slice(&golden, &Limits::default()).unwrap(), m);
        }
    }

    #[test]
    fn payload_in_odd_chunks() {
        let m = Message::InitialParams(params());
        let enc = encode(&m).unwrap();
        let bytes = enc.to_vec();
        let header = FrameHeader::parse(&bytes, &Limits::default()).unwrap();
        let body = &bytes[HEADER_LEN..HEADER_LEN + header.body_len as usize];
        let Decoded::NeedsPayload(p) = decode_control(body, &Limits::default()).unwrap() else {
            panic!("expected payload");
        };
        assert_eq!(p.payload_len(), 24);
        let mut a = p.start().unwrap();
        for c in bytes[HEADER_LEN + header.body_len as usize..].chunks(3) {
            a.push(c).unwrap();
        }
        assert_eq!(a.finish().unwrap(), m);
    }

    #[test]
    fn typed_errors() {
        let lim = Limits::default();
        let good = encode_to_vec(&Message::InitialParams(params())).unwrap();
        assert!(matches!(
            decode_from_slice(&good[..3], &lim),
            Err(Error::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_from_slice(&bad, &lim),
            Err(Error::BadMagic(_))
        ));
        let mut bad = good.clone();
        bad[2] = 9;
        assert!(matches!(
            decode_from_slice(&bad, &lim),
            Err(Error::UnsupportedVersion { got: 9, .. })
        ));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&(2u32 << 20).to_le_bytes());
        assert!(matches!(
            decode_from_slice(&bad, &lim),
            Err(Error::FrameTooLarge { .. })
        ));
        // Payload one value short, and one byte long.
        assert!(matches!(
            decode_from_slice(&good[..good.len() - 4], &lim),
            Err(Error::PayloadLengthMismatch { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode_from_slice(&long, &lim),
            Err(Error::PayloadLengthMismatch { .. })
        ));
        // Payload above the receiver's limit is refused before allocating.
        let small = Limits {
            max_payload_bytes: 16,
            ..lim
        };
        assert!(matches!(
            decode_from_slice(&good, &small),
            Err(Error::PayloadTooLarge { len: 24, max: 16 })
        ));
    }

    #[test]
    fn huge_manifest_is_refused_before_allocation() {
        // A manifest claiming 2^40 values: must be refused by the limit, not by an OOM.
        let m = Control::InitialParams {
            manifest: Manifest::new(vec![TensorSpec {
                name: "x".into(),
                shape: vec![1 << 20, 1 << 20],
            }]),
        };
        let body = postcard::to_allocvec(&m).unwrap();
        assert!(matches!(
            decode_control(&body, &Limits::default()),
            Err(Error::PayloadTooLarge { .. })
        ));
    }
}
